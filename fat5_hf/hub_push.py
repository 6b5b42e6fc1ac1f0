"""Pushing a recipe's output folder to the Hugging Face Hub: one helper for the pretraining, finetuning and
evaluation recipes.

The folder is uploaded as it is on disk (model weights, the custom code that ``save_pretrained`` wrote beside them,
tokenizer files, ``README.md`` model card, results), in one commit, with ``huggingface_hub.HfApi``: the repository is
created if needed (``exist_ok``), then ``upload_folder`` sends every file outside ``ignore_patterns``.
"""

from __future__ import annotations

from pathlib import Path


class HubPushError(ValueError):
    """The push cannot start: the repository id or the folder is wrong; the message names the fix."""


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str | None,
    *,
    private: bool | None = None,
    commit_message: str,
    ignore_patterns: list[str] | None = None,
    token: str | None = None,
):
    """Creates ``repo_id`` (a model repository) if needed and uploads ``folder`` into it in one commit.

    Args:
        folder: the folder to upload; it must hold a ``config.json`` (a saved model) and a ``README.md`` (its card).
        repo_id: ``"user/name"`` or ``"org/name"`` on the Hub.
        private: visibility of a repository created here (an existing repository keeps its own).
        commit_message: the Hub commit's title.
        ignore_patterns: glob patterns of files not to upload (checkpoints, logs); the recipes' run lock
            (`fat5_hf.output_dir.LOCK_FILE`) is never uploaded.
        token: a Hub token; default, the one ``huggingface-cli login`` saved or ``HF_TOKEN``.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the upload.

    Raises:
        HubPushError: no ``repo_id``, or the folder is missing, not a saved model, or has no model card.
    """
    from huggingface_hub import HfApi

    from .output_dir import LOCK_FILE

    if not repo_id:
        raise HubPushError("--push_to_hub needs --hub_model_id (e.g. my-user/fat5-small-fr)")
    folder = Path(folder)
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if missing:
        raise HubPushError(f"{folder} is not a saved model with its card (missing {', '.join(missing)}); not pushed")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=[*(ignore_patterns or []), LOCK_FILE],  # the run's lock is not part of the model
    )
