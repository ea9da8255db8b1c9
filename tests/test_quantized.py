"""Quantized checkpoints, loaded and recorded (`lmeval.model.quantization`): a tiny Llama
written as GGUF files (Q8_0, Q4_0) with the gguf package and loaded through transformers
(dequantized), and torchao weight-only int8 quantized as it loads on CPU; their record in
run.json and divergence.csv (quant_method, load_path, bits per weight)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import lmeval
from conftest import CORPUS, build_model
from helpers import write_jsonl
from lmeval.engine.config import build_config
from lmeval.errors import ConfigError, ModelError
from lmeval.model.loading import load_model
from lmeval.model.quantization import memory_bytes, parameter_count

gguf = pytest.importorskip("gguf", reason="the quant extra's gguf package writes the test's GGUF files")

INT8 = {
    "quant_method": "torchao",
    "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {}}},
}
QTYPES = ("Q8_0", "Q4_0")
# transformers' GGUF loader names (llama.cpp's): the HF module -> the GGUF tensor
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf's permute), which transformers undoes on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path, qtype: str) -> None:
    """``model`` (a Llama) and its byte-level BPE ``tokenizer`` as a GGUF file: every matrix in
    ``qtype``, the norms in F32, the tokenizer as llama.cpp's gpt2 model (tokens, merges)."""
    c, q = model.config, gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    vocab = [piece for piece, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(vocab))])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        a = tensor.detach().float().numpy()
        if name == "lm_head.weight":
            gguf_name = "output.weight"
        elif name in TOP_NAMES:
            gguf_name = TOP_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            gguf_name = f"blk.{layer}.{LAYER_NAMES[module]}.weight"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if module == "self_attn.q_proj" else c.num_key_value_heads
                a = _rope_permute(a, heads)
        if a.ndim == 1:
            w.add_tensor(gguf_name, a.astype(np.float32))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(a, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_bpw(path) -> float:
    """llama.cpp's "BPW": the bytes of every tensor of the file over its elements, from its header."""
    reader = gguf.GGUFReader(str(path))
    return 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bpe_tokenizer):
    """The tiny Llama saved as safetensors (base/) and as two GGUF files in one folder (gguf/)."""
    folder = tmp_path_factory.mktemp("quantized")
    model = build_model("llama", len(bpe_tokenizer))
    model.save_pretrained(folder / "base")
    bpe_tokenizer.save_pretrained(folder / "base")
    (folder / "gguf").mkdir()
    for qtype in QTYPES:
        write_gguf(model, bpe_tokenizer, folder / "gguf" / f"tiny-{qtype}.gguf", qtype)
    data = write_jsonl(folder / "texts.jsonl", [{"text": t} for t in CORPUS * 2])
    return folder, data, model


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_gguf_file_loads_dequantized_with_the_files_own_weights(checkpoints, bpe_tokenizer, qtype):
    folder, _, model = checkpoints
    lm = load_model(folder / "gguf", gguf_file=f"tiny-{qtype}.gguf")
    assert lm.name == f"tiny-{qtype}"
    q = lm.quantization
    assert (q["quant_method"], q["source"], q["load_path"]) == ("gguf", "gguf", "dequantized")
    assert q["gguf_tensor_types"] == {"F32": 5, qtype: 16}  # 2 layers x 7 matrices + embeddings + head
    assert lm.tokenizer.get_vocab() == bpe_tokenizer.get_vocab()  # the file's tokenizer, converted
    # the weights are the file's blocks dequantized (gguf's reference dequantizer), not the float model's
    reader = gguf.GGUFReader(str(folder / "gguf" / f"tiny-{qtype}.gguf"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type).copy())
    loaded = lm.model.get_input_embeddings().weight.detach()
    assert torch.equal(loaded, expected)
    assert not torch.equal(loaded, model.get_input_embeddings().weight.detach())


def test_torchao_int8_weight_only_loads_natively_on_cpu(checkpoints):
    folder, _, model = checkpoints
    lm = load_model(folder / "base", name="int8", quantization_config=INT8, device="cpu")
    q = lm.quantization
    assert (q["quant_method"], q["source"], q["load_path"]) == ("torchao", "load", "native")
    assert q["config"]["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    weight = lm.model.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    # each quantized (out, in) matrix: int8 data, a float32 scale and an int8 zero point per row;
    # the embeddings, head and norms stay float32 (transformers' torchao default)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    n = sum(p.numel() for p in model.parameters())
    in_linears = sum(m.weight.numel() for m in linears)  # Llama's projections have no bias
    quantized = sum(m.out_features * (m.in_features + 4 + 1) for m in linears)
    assert memory_bytes(lm.model) == quantized + 4 * (n - in_linears)
    assert parameter_count(lm.model, "native") == n


def test_a_quantization_config_that_quantizes_nothing_is_refused(saved_gpt2):
    """torchao replaces torch.nn.Linear layers; GPT-2's are Conv1D (and its head is left float by
    default), so nothing would be quantized and the "quantized" model would be the float one."""
    with pytest.raises(ModelError, match=r"must quantize some weight of the model .*GPT2LMHeadModel"):
        load_model(saved_gpt2, quantization_config=INT8, device="cpu")


def test_a_run_of_gguf_and_torchao_variants_records_how_each_was_loaded(checkpoints, tmp_path):
    folder, data, model = checkpoints
    int8 = json.dumps(INT8)
    config = build_config(
        yaml.safe_load(
            f"models:\n  - {{name: base, path: {folder / 'base'}}}\n"
            + "".join(f"  - {{path: {folder / 'gguf'}, gguf_file: tiny-{q}.gguf}}\n" for q in QTYPES)
            + f"  - {{name: int8, path: {folder / 'base'}, quantization_config: {int8}}}\n"
            f"data: {{path: {data}}}\nscoring: {{max_length: 16, batch_tokens: 64}}\n"
            "compare: {divergence: true, baseline: base, bootstrap: 20}\n"
            f"analysis: {{positions: false}}\noutput: {{dir: {tmp_path / 'out'}}}\n"
        ),
        folder,
    )
    tables = lmeval.run(config, show_progress=False, return_tokens=False)
    table = tables["divergence"].set_index("model")
    assert list(table.index) == ["tiny-Q8_0", "tiny-Q4_0", "int8"]
    assert list(table.quant_method) == ["gguf", "gguf", "torchao"]
    assert list(table.load_path) == ["dequantized", "dequantized", "native"]
    n = sum(p.numel() for p in model.parameters())
    assert (table.n_parameters == n).all()  # the logical weights, whatever their storage
    for qtype in QTYPES:  # llama.cpp's BPW of the file (8.5 for Q8_0 blocks, 4.5 for Q4_0, norms F32)
        bpw = llama_cpp_bpw(folder / "gguf" / f"tiny-{qtype}.gguf")
        assert table.loc[f"tiny-{qtype}", "bits_per_weight"] == pytest.approx(bpw, rel=1e-12)
    assert 8.5 < table.loc["tiny-Q8_0", "bits_per_weight"] < 8.6  # 34-byte blocks of 32, and a few F32 norms
    assert 4.5 < table.loc["tiny-Q4_0", "bits_per_weight"] < 4.6  # 18-byte blocks of 32
    assert 9 < table.loc["int8", "bits_per_weight"] < 32  # int8 matrices, float32 embeddings and head
    # coarser quantization, larger divergence; every variant moved
    assert 0 < table.loc["tiny-Q8_0", "kl_mean"] < table.loc["tiny-Q4_0", "kl_mean"]
    assert table.loc["int8", "kl_mean"] > 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    models = run["protocol"]["models"]
    assert models["base"]["quantization"] is None
    assert models["tiny-Q4_0"]["quantization"]["gguf_tensor_types"] == {"F32": 5, "Q4_0": 16}
    assert models["tiny-Q4_0"]["weight_bytes_from"] == "the GGUF file's tensors"
    assert models["int8"]["quantization"]["config"]["quant_method"] == "torchao"
    assert models["int8"]["weight_bytes_from"] == "the quantized weights in memory (quantized at load)"
    assert run["divergence"]["protocol"]["int8"]["quantization"]["load_path"] == "native"
    # the GGUF files are part of the run's identity: a rewritten file is another model
    assert {"tiny-Q8_0.gguf", "tiny-Q4_0.gguf"} <= set(run["models"]["tiny-Q4_0"]["files"])


def test_quantization_keys_are_validated_with_the_rest(tmp_path):
    raw = {
        "models": [
            {"path": "gpt2", "gguf_file": "model.bin"},
            {"path": "gpt2", "name": "q", "quantization_config": {"load_in_4bit": True}},
            {"path": "gpt2", "name": "both", "gguf_file": "m.gguf", "quantization_config": {"quant_method": "gptq"}},
        ],
        "data": {"path": "wikitext"},
    }
    with pytest.raises(ConfigError) as err:
        build_config(raw, tmp_path)
    message = str(err.value)
    assert "models[0].gguf_file: must be the name of a .gguf file" in message
    assert "models[1].quantization_config: must name its quant_method" in message
    assert "models[2].quantization_config: cannot be set together with gguf_file" in message


def test_a_gguf_path_or_a_missing_gguf_file_is_refused_with_the_fix(checkpoints):
    folder, _, _ = checkpoints
    with pytest.raises(ModelError, match=r"gguf_file: tiny-Q8_0.gguf"):
        load_model(folder / "gguf" / "tiny-Q8_0.gguf")
    with pytest.raises(ModelError, match=r"it holds tiny-Q4_0.gguf, tiny-Q8_0.gguf"):
        load_model(folder / "gguf", gguf_file="tiny-Q2_K.gguf")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "quantization",
    [{"quant_method": "bitsandbytes", "load_in_8bit": True}, {"quant_method": "bitsandbytes", "load_in_4bit": True}],
    ids=["bnb-int8", "bnb-nf4"],
)
def test_bitsandbytes_quantized_at_load_on_a_gpu(checkpoints, quantization):
    """bitsandbytes (like GPTQ, AWQ and compressed-tensors checkpoints, which load through the
    same from_pretrained) needs CUDA: the same record, natively loaded."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("bitsandbytes")
    folder, _, model = checkpoints
    lm = load_model(folder / "base", name="bnb", quantization_config=quantization, device="cuda")
    assert (lm.quantization["quant_method"], lm.quantization["load_path"]) == ("bitsandbytes", "native")
    assert parameter_count(lm.model, "native") == sum(p.numel() for p in model.parameters())
    table = lmeval.divergence(CORPUS[:3], lm, load_model(folder / "base", device="cuda"), max_length=16)
    assert (table.kl >= 0).all() and table.kl.mean() > 0
