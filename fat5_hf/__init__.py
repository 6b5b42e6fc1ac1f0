"""fat5-hf: fast T5-family encoder-decoders for Hugging Face Transformers + Accelerate."""

__version__ = "0.1.0.dev0"

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTextEncoding,
    AutoModelForTokenClassification,
)

from .configuration_fat5 import FAT5Config
from .modeling_fat5 import (
    FAT5EncoderModel,
    FAT5ForConditionalGeneration,
    FAT5ForQuestionAnswering,
    FAT5ForSequenceClassification,
    FAT5ForTokenClassification,
    FAT5Model,
    FAT5PreTrainedModel,
    FAT5Seq2SeqLMOutput,
)
from .monkey_patch import FAT5PatchReport, apply_fat5_kernels

# Make `AutoConfig.for_model("fat5")`, `AutoModelForSeq2SeqLM.from_pretrained(<fat5 folder>)` etc. work once
# `fat5_hf` is imported (the Hub export adds `auto_map` for `trust_remote_code` users instead).
AutoConfig.register("fat5", FAT5Config, exist_ok=True)
AutoModel.register(FAT5Config, FAT5Model, exist_ok=True)
AutoModelForSeq2SeqLM.register(FAT5Config, FAT5ForConditionalGeneration, exist_ok=True)
AutoModelForTextEncoding.register(FAT5Config, FAT5EncoderModel, exist_ok=True)
AutoModelForSequenceClassification.register(FAT5Config, FAT5ForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(FAT5Config, FAT5ForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(FAT5Config, FAT5ForQuestionAnswering, exist_ok=True)

__all__ = [
    "FAT5Config",
    "FAT5EncoderModel",
    "FAT5ForConditionalGeneration",
    "FAT5ForQuestionAnswering",
    "FAT5ForSequenceClassification",
    "FAT5ForTokenClassification",
    "FAT5Model",
    "FAT5PreTrainedModel",
    "FAT5PatchReport",
    "FAT5Seq2SeqLMOutput",
    "__version__",
    "apply_fat5_kernels",
]
