"""Our models against Hugging Face transformers' PyTorch implementations (the reference).

Tiny random configs in float32; every weight (norm scales included) is randomised so that a
wrong mapping cannot hide behind an identity. Sequences are longer than the sliding window.
Tolerance: max abs logit difference 1e-4, never loosened.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from train.models.hf import HFFormatError, config_from_hf, load_hf, save_hf  # noqa: E402

TOL = 1e-4
SEQ = 21

HF_CONFIGS = {
    # MQA, H*head_dim (64) != d_model (32)
    "gemma": dict(
        model_type="gemma",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
    ),
    # GQA, soft-caps small enough to bite, query_pre_attn_scalar != head_dim, window 6
    "gemma2": dict(
        model_type="gemma2",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=24,
        sliding_window=6,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
    ),
    # 5 local : 1 global + a tail layer, QK-norm, separate RoPE bases, linear scaling x8 on global
    "gemma3": dict(
        model_type="gemma3_text",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=5,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    ),
    # recurrent, recurrent, attention, recurrent, recurrent; d=48 so sqrt(d) is bf16-rounded
    "recurrent_gemma": dict(
        model_type="recurrent_gemma",
        vocab_size=97,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=1,
        lru_width=48,
        attention_window_size=6,
        conv1d_width=4,
        logits_soft_cap=30.0,
    ),
}


def make_hf_model(name: str, seed: int = 0):
    cfg = dict(HF_CONFIGS[name])
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            scale = 0.3 if p.ndim == 1 else 0.15
            p.copy_(torch.randn_like(p) * scale)
            if "recurrent_param" in pname:
                p.copy_(torch.rand_like(p) * 2.0 - 1.0)
    return model.float().eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), use_cache=False).logits.numpy()


def tokens_for(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("scan", [True, False])
def test_import_matches_transformers(name, scan, tmp_path):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path, scan_layers=scan)
    toks = tokens_for(model.cfg.vocab_size)
    ours = np.asarray(model(jnp.asarray(toks)))
    ref = hf_logits(hf, toks)
    assert ours.shape == ref.shape
    # the window matters at this length: a model without it must differ
    assert model.cfg.sliding_window is None or SEQ > model.cfg.sliding_window
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_reloads_in_transformers(name, tmp_path):
    hf = make_hf_model(name, seed=3)
    hf.save_pretrained(tmp_path / "src")
    model = load_hf(tmp_path / "src")
    save_hf(model, tmp_path / "out")
    reloaded = (
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "out", attn_implementation="eager"
        )
        .float()
        .eval()
    )
    toks = tokens_for(model.cfg.vocab_size, seed=5)
    np.testing.assert_allclose(
        hf_logits(reloaded, toks), np.asarray(model(jnp.asarray(toks))), atol=TOL, rtol=0
    )
    # and our own reader gets the same parameters back
    again = load_hf(tmp_path / "out")
    np.testing.assert_allclose(
        np.asarray(again(jnp.asarray(toks))),
        np.asarray(model(jnp.asarray(toks))),
        atol=1e-6,
        rtol=0,
    )


def test_sharded_checkpoint_and_bf16(tmp_path):
    hf = make_hf_model("gemma3")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    toks = tokens_for(97)
    model = load_hf(tmp_path)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(toks))), hf_logits(hf, toks), atol=TOL, rtol=0
    )
    m16 = load_hf(tmp_path, param_dtype="bfloat16", compute_dtype="bfloat16")
    assert m16.embed[...].dtype == jnp.bfloat16
    # bf16 is an approximation: close, not equal
    assert np.abs(np.asarray(m16(jnp.asarray(toks))) - hf_logits(hf, toks)).max() < 0.5


def test_legacy_gemma3_config_keys():
    cfg = config_from_hf(
        dict(
            model_type="gemma3_text",
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=8,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            sliding_window=4,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            sliding_window_pattern=6,
        )
    )
    assert cfg.layer_pattern == ("local",) * 5 + ("global",)
    assert (cfg.rope_base, cfg.rope_local_base, cfg.rope_global_scale) == (1e6, 1e4, 8.0)


def write_checkpoint(tmp_path, name="gemma"):
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    return tmp_path


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = write_checkpoint(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFFormatError, match="model_type 'llama' is not supported"):
        load_hf(path)


def test_missing_tensor_names_it(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = write_checkpoint(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(HFFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    path = write_checkpoint(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFFormatError, match=r"layers\.0\.mlp\.gate_proj\.weight.*shape"):
        load_hf(path)


def test_missing_directory(tmp_path):
    with pytest.raises(HFFormatError, match="config.json: not found"):
        load_hf(tmp_path / "nope")
