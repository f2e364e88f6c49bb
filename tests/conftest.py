"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton_ops, so it is set here,
at the top, whenever no CUDA device is present and the caller did not choose."""

import contextlib
import os
import tempfile

import pytest
import torch

# --- interpreter mode, before any kernel module is imported (torch itself does not import triton_ops) ---
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Calibration caches and preset checkpoints go to a throwaway folder, not the user's ~/.cache.
os.environ.setdefault("ISO_KERNELS_CACHE_DIR", tempfile.mkdtemp(prefix="iso_kernels_test_cache_"))


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_multi = pytest.mark.skip(reason="needs >= 2 GPUs")
    for item in items:
        if "gpu" in item.keywords and n_gpus < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Where kernel tests put their tensors: CUDA when present, else CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _triton_kernels_on_cpu():
    """A test-only override: every custom op runs its Triton kernel on CPU tensors too (interpreted). With an
    op's CPU kernel disabled, torch.library runs the function ``custom_op`` decorated: the Triton launcher."""
    from iso_kernels.ops import CUSTOM_OPS

    with contextlib.ExitStack() as stack:
        for op in CUSTOM_OPS:
            stack.enter_context(op.set_kernel_enabled("cpu", False))
        yield


@pytest.fixture
def triton_backend():
    """The ops' Triton kernels, on CPU tensors too (interpreted); CUDA tensors run them anyway."""
    with _triton_kernels_on_cpu():
        yield


@pytest.fixture
def backend(request):
    """Parametrize indirectly: ``"torch"`` leaves CPU tensors on each op's CPU kernel, ``"triton"`` runs its
    Triton kernel (as ``triton_backend``)."""
    if request.param not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {request.param!r}")
    with _triton_kernels_on_cpu() if request.param == "triton" else contextlib.nullcontext():
        yield request.param


# --- tiny Hugging Face checkpoints: the model's oracle (tests/test_model.py) and real checkpoint files ---


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Llama (llama3 rope), Mistral and Qwen2 (sliding windows), Qwen3, Mixtral and Qwen3-MoE, each saved with
    save_pretrained, with HF's logits for a prompt and its greedy continuation."""
    from helpers import HF_BATCH, HF_COMMON, HF_DECODE_STEPS, HF_LLAMA3_ROPE, HF_SEQ_LEN

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    families = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_parameters=HF_LLAMA3_ROPE)),
        # sliding windows shorter than the prompt: every layer (Mistral), from max_window_layers on (Qwen2)
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=16)),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                  dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=16, max_window_layers=1)),
        # q/k norms, and a head_dim that is not hidden / heads (4 x 32 query features from 64)
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=True)),
        # mixtures of experts: every layer (Mixtral), every layer but mlp_only_layers, unnormalised (Qwen3-MoE)
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                    dict(num_local_experts=4, num_experts_per_tok=2)),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=32,
                           norm_topk_prob=False, mlp_only_layers=[1])),
    }
    made = {}
    for seed, (family, (config_cls, model_cls, extra)) in enumerate(families.items()):
        torch.manual_seed(seed)  # the same weights and prompt every run
        model = model_cls(config_cls(**HF_COMMON, **extra)).eval()
        if family == "qwen2":
            assert model.config.tie_word_embeddings
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        tokens = torch.randint(0, HF_COMMON["vocab_size"], (HF_BATCH, HF_SEQ_LEN))
        with torch.no_grad():
            logits = model(tokens).logits
            sequence = tokens
            for _ in range(HF_DECODE_STEPS):
                next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, next_token], dim=1)
            decode_logits = model(sequence).logits[:, HF_SEQ_LEN:]
        made[family] = dict(folder=str(folder), tokens=tokens, logits=logits, sequence=sequence,
                            decode_logits=decode_logits)
    return made


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random llama-tiny checkpoint folder."""
    from iso_kernels import checkpoint

    return checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")


@pytest.fixture(scope="module")
def native():
    """The native extension ``iso_kernels._C``: skips where the build deliberately skipped it (no CUDA
    toolkit), fails where it should have loaded."""
    from iso_kernels import _ext

    module = _ext.load()
    if module is None:
        record = _ext._build_record()
        if record.get("ext") == "skipped":
            pytest.skip(f"the build skipped _C: {record.get('reason')}")
        pytest.fail(f"iso_kernels._C did not load although the build did not skip it: {_ext.ext_reason()}")
    return module
