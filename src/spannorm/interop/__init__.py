"""Checkpoints in and out: Hugging Face Llama-style directories (Llama, Mistral, Qwen2) in, any placement out
(as Llama, or with spannorm's own modeling code for ``trust_remote_code``), and conversions between placements
for continued pretraining. Reading and writing need only safetensors; running the HF model (parity
checks) needs the optional ``transformers`` extra."""

from spannorm.interop.errors import InteropError
from spannorm.interop.hf_export import (
                                        ExportResult,
                                        export_hf,
                                        export_hf_remote_code,
                                        export_model,
                                        llama_config_dict,
                                        llama_incompatibilities,
                                        llama_state_dict,
)
from spannorm.interop.hf_import import (
                                        SUPPORTED_ARCHITECTURES,
                                        import_hf,
                                        load_tokenizer,
                                        model_config_from_hf,
                                        read_hf_config,
)
from spannorm.interop.init_from import (
                                        ConversionReport,
                                        checkpoint_kind,
                                        checkpoint_model_config,
                                        convert_model,
                                        init_model_from,
                                        load_checkpoint,
)
from spannorm.interop.parity import max_logit_difference

__all__ = ["SUPPORTED_ARCHITECTURES", "ConversionReport", "ExportResult", "InteropError", "checkpoint_kind",
           "checkpoint_model_config", "convert_model", "export_hf", "export_hf_remote_code", "export_model",
           "import_hf", "init_model_from", "llama_config_dict", "llama_incompatibilities", "llama_state_dict",
           "load_checkpoint", "load_tokenizer", "max_logit_difference", "model_config_from_hf", "read_hf_config"]
