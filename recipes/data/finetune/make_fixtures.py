"""Writes the finetuning fixtures of this folder from the sentence templates and word lists below (written for
fat5-hf, CC0-1.0). Deterministic: rerunning it rewrites byte-identical files.

    python recipes/data/finetune/make_fixtures.py
"""

import json
import random
from pathlib import Path

root = Path(__file__).resolve().parent
rng = random.Random(20261207)


def write(task, split, rows):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------- allocine: review, label (0 neg, 1 pos)
films = [
    "ce film",
    "ce drame",
    "cette comédie",
    "ce thriller",
    "ce film d'animation",
    "ce western",
    "ce documentaire",
    "cette adaptation",
    "ce polar",
    "cette fresque historique",
    "ce premier long métrage",
    "cette suite",
]
pos_open = [
    "J'ai adoré {f}.",
    "Quelle belle surprise que {f} !",
    "{F} est une réussite.",
    "Un vrai coup de cœur pour {f}.",
    "{F} m'a ému aux larmes.",
    "On ressort de {f} le sourire aux lèvres.",
]
neg_open = [
    "J'ai détesté {f}.",
    "Quelle déception que {f} !",
    "{F} est un échec.",
    "Je me suis ennuyé pendant tout {f}.",
    "{F} m'a profondément agacé.",
    "On ressort de {f} avec l'envie de réclamer son argent.",
]
pos_mid = [
    "Les acteurs sont excellents et justes.",
    "La mise en scène est élégante et inventive.",
    "Le scénario est captivant du début à la fin.",
    "La photographie est magnifique.",
    "La musique accompagne parfaitement l'émotion.",
    "Les dialogues sont drôles et bien écrits.",
    "L'histoire est touchante et sincère.",
    "Le rythme ne faiblit jamais.",
]
neg_mid = [
    "Les acteurs sont mauvais et sonnent faux.",
    "La mise en scène est plate et sans idée.",
    "Le scénario est prévisible et creux.",
    "La photographie est terne.",
    "La musique est envahissante et pénible.",
    "Les dialogues sont lourds et ridicules.",
    "L'histoire est confuse et sans intérêt.",
    "Le rythme est d'une lenteur insupportable.",
]
pos_end = [
    "À voir absolument.",
    "Je le recommande vivement.",
    "Un chef-d'œuvre.",
    "Bravo à toute l'équipe.",
    "Je le reverrai avec plaisir.",
    "Une merveille.",
]
neg_end = [
    "À éviter.",
    "Je ne le recommande pas.",
    "Un navet.",
    "Quel gâchis.",
    "Deux heures perdues.",
    "Une catastrophe.",
]


def review(label):
    f = rng.choice(films)
    o = rng.choice(pos_open if label else neg_open).format(f=f, F=f[0].upper() + f[1:])
    mids = rng.sample(pos_mid if label else neg_mid, 2)
    return " ".join([o, *mids, rng.choice(pos_end if label else neg_end)])


def allocine(n):
    rows = []
    for i in range(n):
        label = i % 2
        rows.append({"review": review(label), "label": label})
    rng.shuffle(rows)
    return rows


for split, n in (("train", 160), ("validation", 40), ("test", 40)):
    write("allocine", split, allocine(n))

# ---------------- xnli-fr: premise, hypothesis, label (0 entailment, 1 neutral, 2 contradiction)
people = ["Marie", "Paul", "Léa", "Hugo", "Chloé", "Louis", "Inès", "Jules", "Camille", "Nathan", "Sarah", "Théo"]
places = ["Lyon", "Marseille", "Lille", "Nantes", "Bordeaux", "Toulouse", "Rennes", "Strasbourg", "Nice", "Dijon"]
acts = [
    ("prend le train pour {p}", "voyage vers {p}", "reste chez lui toute la semaine", "part pour affaires"),
    ("achète du pain à {p}", "fait des courses à {p}", "n'achète rien aujourd'hui", "achète aussi des croissants"),
    (
        "joue du piano à {p}",
        "fait de la musique à {p}",
        "ne sait jouer d'aucun instrument",
        "donne un concert ce soir",
    ),
    ("court un marathon à {p}", "fait du sport à {p}", "ne fait jamais de sport", "gagne la course"),
    ("lit un roman dans un café de {p}", "lit un livre à {p}", "ne lit jamais", "lit un roman policier"),
]


def xnli(n):
    rows = []
    for i in range(n):
        who, p = rng.choice(people), rng.choice(places)
        a = rng.choice(acts)
        label = i % 3
        premise = f"{who} {a[0].format(p=p)}."
        hyp = f"{who} {(a[1], a[3], a[2])[label].format(p=p)}."
        rows.append({"premise": premise, "hypothesis": hyp, "label": label})
    rng.shuffle(rows)
    return rows


for split, n in (("train", 60), ("validation", 18), ("test", 18)):
    write("xnli-fr", split, xnli(n))


# ---------------- pawsx-fr: id, sentence1, sentence2, label (0 not paraphrase, 1 paraphrase)
def pawsx(n, start):
    rows = []
    for i in range(n):
        a, b = rng.sample(people, 2)
        p = rng.choice(places)
        s1 = f"{a} a rencontré {b} à {p} en {rng.randint(1990, 2020)}."
        year = s1.split(" en ")[1].rstrip(".")
        if i % 2:
            s2 = f"En {year}, {a} a rencontré {b} à {p}."
        else:
            s2 = f"En {year}, {b} a rencontré {a} à {rng.choice([x for x in places if x != p])}."
        rows.append({"id": start + i, "sentence1": s1, "sentence2": s2, "label": i % 2})
    rng.shuffle(rows)
    return rows


for split, n, s in (("train", 40, 0), ("validation", 12, 1000), ("test", 12, 2000)):
    write("pawsx-fr", split, pawsx(n, s))

# ---------------- french-ner: tokens, ner_tags (0 O, 1 PER, 2 ORG, 3 LOC, 4 MISC), dataset
per = [
    ["Marie", "Curie"],
    ["Victor", "Hugo"],
    ["Simone", "Veil"],
    ["Jean", "Moulin"],
    ["Louise", "Michel"],
    ["Albert", "Camus"],
    ["Agnès", "Varda"],
    ["Émile", "Zola"],
]
org = [
    ["la", "SNCF"],
    ["l'", "Inria"],
    ["Airbus"],
    ["le", "CNRS"],
    ["la", "Croix-Rouge"],
    ["Radio", "France"],
    ["l'", "Unesco"],
]
loc = [["Paris"], ["Lyon"], ["Saint-Étienne"], ["Aix-en-Provence"], ["Bretagne"], ["Corse"], ["Grenoble"], ["Québec"]]
misc = [["Goncourt"], ["Tour", "de", "France"], ["Nobel"], ["Festival", "de", "Cannes"], ["Jeux", "olympiques"]]
templates = [
    [("PER",), "travaille", "pour", ("ORG",), "à", ("LOC",), "."],
    ["Hier", ",", ("PER",), "a", "visité", ("LOC",), "."],
    [("ORG",), "ouvre", "un", "bureau", "à", ("LOC",), "."],
    [("PER",), "a", "reçu", "le", "prix", ("MISC",), "."],
    ["Le", ("MISC",), "passe", "par", ("LOC",), "cette", "année", "."],
    ["Selon", ("ORG",), ",", ("PER",), "arrivera", "demain", "."],
]
ids = {"O": 0, "PER": 1, "ORG": 2, "LOC": 3, "MISC": 4}
pools = {"PER": per, "ORG": org, "LOC": loc, "MISC": misc}


def ner(n):
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for part in rng.choice(templates):
            if isinstance(part, tuple):
                words = rng.choice(pools[part[0]])
                if part[0] == "ORG" and words[0] in ("la", "le", "l'"):  # the article is not part of the entity
                    tokens.append(words[0])
                    tags.append(0)
                    words = words[1:]
                tokens += words
                tags += [ids[part[0]]] * len(words)
            else:
                tokens.append(part)
                tags.append(0)
        rows.append({"tokens": tokens, "ner_tags": tags, "dataset": "fat5-hf-fixture"})
    return rows


for split, n in (("train", 60), ("validation", 16), ("test", 16)):
    write("french-ner", split, ner(n))

# ---------------- french-qa: context, question, answer, answer_start, dataset
facts = []
jobs = ["chimiste", "romancier", "peintre", "architecte", "musicienne", "ingénieure", "photographe", "botaniste"]
cities = ["Lyon", "Rouen", "Brest", "Nancy", "Avignon", "Limoges", "Poitiers", "Angers", "Metz", "Pau"]
firsts = [
    "Adèle",
    "Bastien",
    "Céline",
    "Damien",
    "Éloïse",
    "Fabien",
    "Gaëlle",
    "Honoré",
    "Irène",
    "Joël",
    "Karine",
    "Lucien",
]
lasts = ["Morel", "Lefèvre", "Girard", "Bonnet", "Dupuis", "Lambert", "Fontaine", "Rousseau", "Mercier", "Blanc"]


def qa(n):
    rows = []
    for i in range(n):
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        job, city, year = rng.choice(jobs), rng.choice(cities), str(rng.randint(1850, 1990))
        other = rng.choice([c for c in cities if c != city])
        context = (
            f"{name} est une personnalité connue comme {job}. Elle est née à {city} en {year}. "
            f"Plus tard, elle s'installe à {other}, où elle ouvre un atelier."
        )
        kind = i % 4
        if kind == 0:
            q, a = f"Où est née {name} ?", city
            start = context.index(f"née à {city}") + len("née à ")
        elif kind == 1:
            q, a = f"En quelle année est née {name} ?", year
            start = context.index(f" en {year}") + len(" en ")
        elif kind == 2:
            q, a = f"Dans quelle ville {name} ouvre-t-elle un atelier ?", other
            start = context.index(f"à {other},") + len("à ")
        else:
            q, a, start = f"Combien d'enfants a eu {name} ?", "", -1
        assert a == "" or context[start : start + len(a)] == a
        rows.append(
            {"context": context, "question": q, "answer": a, "answer_start": start, "dataset": "fat5-hf-fixture"}
        )
    return rows


for split, n in (("train", 80), ("validation", 16), ("test", 16)):
    write("french-qa", split, qa(n))

# ---------------- orange-sum: text, summary
topics = [
    (
        "La mairie de {c}",
        "a annoncé la rénovation complète de la médiathèque",
        "Les travaux commenceront au printemps et dureront deux ans.",
        "Les horaires d'ouverture seront réduits pendant le chantier.",
    ),
    (
        "Un incendie à {c}",
        "a détruit un entrepôt de la zone industrielle",
        "Aucun blessé n'est à déplorer selon les pompiers.",
        "Une enquête a été ouverte pour déterminer l'origine du feu.",
    ),
    (
        "Le club de football de {c}",
        "a remporté la finale régionale",
        "Les supporters ont fêté la victoire toute la nuit.",
        "L'entraîneur a salué l'esprit d'équipe de ses joueurs.",
    ),
    (
        "Une start-up de {c}",
        "a levé trois millions d'euros",
        "Elle développe des batteries pour vélos électriques.",
        "Une vingtaine d'embauches sont prévues d'ici la fin de l'année.",
    ),
    (
        "Le festival d'été de {c}",
        "a accueilli un public record",
        "Plus de quarante concerts ont eu lieu en quatre jours.",
        "Les organisateurs préparent déjà l'édition suivante.",
    ),
]


def summ(n):
    rows = []
    for _ in range(n):
        subj, verb, d1, d2 = rng.choice(topics)
        c = rng.choice(cities)
        s = subj.format(c=c)
        day = rng.choice(["lundi", "mardi", "mercredi", "jeudi", "vendredi"])
        text = f"{s} {verb}, a-t-on appris ce {day}. {d1} {d2}"
        rows.append({"text": text, "summary": f"{s} {verb}."})
    return rows


for split, n in (("train", 40), ("validation", 10), ("test", 10)):
    write("orange-sum", split, summ(n))
