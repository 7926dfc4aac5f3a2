"""
Hugging Face checkpoints in (mlm_vs_clm/hf.py: load_hf; mlm_vs_clm/tokenizer.py: "hf:...") and
out as Llama decoders, compared with transformers and tokenizers themselves, and train.py and
finetune.py starting from them, FSDP included; train.py continuing from an exported encoder. The
encoder and fine-tuned exports are in test_hf_export.py. Everything is built locally (tiny random
Llamas, a BPE trained on a few KB): nothing is downloaded.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import data
import finetune as ft
from mlm_vs_clm import export, hf
from mlm_vs_clm import tokenizer as hf_tokenizer
import train
from mlm_vs_clm.checkpoints import checkpoint_payload
from tests.helpers import HERE, read_log, write_jsonl
from mlm_vs_clm.tokenizer import get_tokenizer

# Every test here builds a checkpoint or a tokenizer with transformers or tokenizers and compares
# against them; the FSDP one runs torchrun too.
pytestmark = pytest.mark.slow

TRAIN_TEXT = open(textwrap.__file__, encoding="utf-8").read()[:12000] + \
    " naïve café 東京 Ünïcödé 12345 3.14 🙂"
SAMPLE = ("Hello world! naïve café, 東京 and Ünïcödé 🙂🙂.\n\n"
          "    def f(x):\n\treturn x ** 2  # squared\n"
          "Numbers: 1234567 3.14159 1,000,000 and 0xFF. don't I'LL we've   spaces   \t\t tabs\r\n"
          "\n\n  end 42"
          "  trailing   ")
LLAMA3_REGEX = hf_tokenizer.LLAMA3_PATTERN
try:  # optional: the tests that compare with the Hugging Face libraries skip without them
    import tokenizers
    import transformers
except ImportError:
    tokenizers = transformers = None
needs_hf = pytest.mark.skipif(transformers is None or tokenizers is None,
                              reason="needs the Hugging Face libraries: "
                                     "pip install transformers tokenizers")

def train_bpe(path, pre_tokenizer):
    """A 300-token byte-level BPE trained by the tokenizers library, written as
    path/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TRAIN_TEXT], trainer)
    os.makedirs(path, exist_ok=True)
    tk.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tk

def llama3_pre():
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

def make_llama(path, tie=False, rope_scaling=None, shard=False, **overrides):
    """A tiny random LlamaForCausalLM with a trained tokenizer, saved like a Hub checkpoint."""
    tk = train_bpe(path, llama3_pre())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=500000.0,
                                      tie_word_embeddings=tie, rope_scaling=rope_scaling,
                                      eos_token_id=0, **overrides)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm gains are ones at init: randomise them so a swap would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    return model

def ours(path):
    tok = get_tokenizer("hf:" + str(path))
    return hf.load_hf(str(path), tok).eval(), tok

def hf_logits(model, ids, causal=True):
    # Bidirectional in transformers >= 5: is_causal=False (a forward argument, or "is_causal": false
    # in config.json) makes a Llama attend both ways, with eager and sdpa attention alike (a 4D
    # boolean mask does too, but only with sdpa: eager adds it to the scores)
    with torch.no_grad():
        return model(ids).logits if causal else model(ids, is_causal=False).logits

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

@needs_hf
@pytest.mark.parametrize("tie,scaling", [(False, None), (True, None), (False, LLAMA3_SCALING)])
def test_import_matches_transformers(tmp_path, tie, scaling):
    ref = make_llama(tmp_path, tie=tie, rope_scaling=scaling)
    model, tok = ours(tmp_path)
    V = ref.config.vocab_size
    assert tok.base_vocab == V and tok.n_vocab == V + 2  # <|mask|>, <|pad|> added (next test)
    ids = torch.tensor([tok.encode(SAMPLE)[:48]] * 2)
    with torch.no_grad():
        for causal in (True, False):
            got = model.logits(model(ids, causal=causal))[..., :V]
            torch.testing.assert_close(got, hf_logits(ref, ids, causal), atol=2e-5, rtol=1e-4)
    assert model.config.tie_embeddings == tie and \
        (model.lm_head.weight is model.embed.weight) == tie
    assert (model.config.rope_scaling is not None) == (scaling is not None)

@needs_hf
def test_added_tokens_and_padding_rows(tmp_path):
    make_llama(tmp_path)
    model, tok = ours(tmp_path)
    names = tok.encoding._special_tokens
    V = tok.base_vocab
    # eos from tokenizer_config.json; no mask and no pad distinct from eos in the checkpoint:
    # both added after it
    assert (tok.eot_id, tok.mask_id) == (names["<|endoftext|>"], V)
    assert tok.pad_id == V + 1 and tok.n_vocab == V + 2
    assert model.embed.weight.shape[0] == model.config.padded_vocab_size >= V + 2
    mean = model.embed.weight[:V].mean(0)
    torch.testing.assert_close(model.embed.weight[V:],
                               mean.expand(model.embed.weight.shape[0] - V, -1))
    assert tok.meta()["digest"] and tok.meta()["n_vocab"] == V + 2

@needs_hf
def test_sharded_checkpoint_loads(tmp_path):
    ref = make_llama(tmp_path, shard=True)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    model, tok = ours(tmp_path)
    ids = torch.tensor([tok.encode(SAMPLE)[:32]])
    with torch.no_grad():
        got = model.logits(model(ids))[..., :ref.config.vocab_size]
    torch.testing.assert_close(got, hf_logits(ref, ids), atol=2e-5, rtol=1e-4)

@needs_hf
@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip(tmp_path, tie):
    make_llama(tmp_path / "src", tie=tie, rope_scaling=LLAMA3_SCALING)
    model, tok = ours(tmp_path / "src")
    torch.save(checkpoint_payload(model, tokenizer=tok.meta()), tmp_path / "ckpt.pt")
    out = export.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"), "decoder").out_dir
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.vocab_size == tok.n_vocab
    ids = torch.tensor([tok.encode(SAMPLE)[:40] + [tok.mask_id, tok.pad_id]])
    for attention in ("sdpa", "eager"):
        back = transformers.AutoModelForCausalLM.from_pretrained(
            out, attn_implementation=attention).eval()
        with torch.no_grad():
            for causal in (True, False):
                ref = model.logits(model(ids, causal=causal))[..., :tok.n_vocab]
                torch.testing.assert_close(hf_logits(back, ids, causal), ref, atol=2e-5,
                                           rtol=1e-4)
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast(SAMPLE, add_special_tokens=False)["input_ids"] == tok.encode(SAMPLE)
    assert fast.mask_token_id == tok.mask_id and fast.eos_token_id == tok.eot_id
    # and back in again: the exported directory is itself an hf: checkpoint with the same tokenizer
    again, tok2 = ours(out)
    assert tok2.encode(SAMPLE) == tok.encode(SAMPLE) and tok2.mask_id == tok.mask_id and \
        tok2.n_vocab == tok.n_vocab

@needs_hf
@pytest.mark.parametrize("style", ["llama3", "gpt2", "digits"])
def test_tokenizer_matches_tokenizers_library(tmp_path, style):
    from tokenizers import pre_tokenizers
    pre = {"llama3": llama3_pre(), "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
           "digits": pre_tokenizers.Sequence([
               pre_tokenizers.Digits(individual_digits=True),
               pre_tokenizers.ByteLevel(add_prefix_space=False)])}[style]
    tk = train_bpe(tmp_path, pre)
    tok = get_tokenizer(f"hf:{tmp_path}")
    texts = [SAMPLE, TRAIN_TEXT[:3000], "x  1  2\n 3", " 007 agent", "a\u00a0b\u2003c",
             "İstanbul ǅ ÅÆ"]
    for text in texts:
        assert tok.encode(text) == tk.encode(text, add_special_tokens=False).ids, text[:40]
        assert tok.decode(tok.encode(text)) == text

@needs_hf
def test_cl100k_tokenizer_json_matches_tiktoken(tmp_path):
    tok = get_tokenizer("cl100k_8k")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(export.tokenizer_json(tok)))
    tk = tokenizers.Tokenizer.from_file(str(path))
    for text in (SAMPLE, TRAIN_TEXT[:4000]):
        assert tk.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert tk.token_to_id("<|mask|>") == tok.mask_id

@needs_hf
def test_tiktoken_format_tokenizer_model(tmp_path):
    import base64
    train_bpe(tmp_path / "json", llama3_pre())
    reference = get_tokenizer(f"hf:{tmp_path / 'json'}")
    os.makedirs(tmp_path / "tt")
    with open(tmp_path / "tt" / "tokenizer.model", "w") as f:
        for token, rank in reference.encoding._mergeable_ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    with open(tmp_path / "tt" / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>",
                   "added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": True}}}, f)
    tok = get_tokenizer(f"hf:{tmp_path / 'tt'}")
    assert tok.encode(SAMPLE) == reference.encode(SAMPLE) and \
        tok.meta()["digest"] == reference.meta()["digest"]

@needs_hf
def test_bad_inputs_name_the_file(tmp_path):
    tok = None
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf.load_hf(str(tmp_path), tok)
    make_llama(tmp_path / "m")
    tok = get_tokenizer(f"hf:{tmp_path / 'm'}")
    config = json.loads((tmp_path / "m" / "config.json").read_text())

    def with_config(**changes):
        d = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        shutil.copytree(tmp_path / "m", d)
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return str(d)

    with pytest.raises(ValueError, match=r"config\.json: .*attention_bias=true"):
        hf.load_hf(with_config(attention_bias=True), tok)
    with pytest.raises(ValueError, match=r"sliding_window=4096"):
        hf.load_hf(with_config(model_type="mistral", sliding_window=4096), tok)
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*hidden_act 'gelu'"):
        hf.load_hf(with_config(model_type="gpt2", hidden_act="gelu"), tok)
    with pytest.raises(ValueError, match=r"head_dim 8 != hidden_size"):
        hf.load_hf(with_config(head_dim=8), tok)
    with pytest.raises(ValueError, match=r"rope type 'yarn'"):
        hf.load_hf(with_config(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                "rope_theta": 1e4}), tok)
    with pytest.raises(ValueError, match=r"config\.json: vocab_size 999.*same checkpoint"):
        hf.load_hf(with_config(vocab_size=999), tok)
    # a missing and a truncated shard
    make_llama(tmp_path / "sh", shard=True)
    shards = sorted(f for f in os.listdir(tmp_path / "sh") if f.endswith(".safetensors"))
    os.remove(tmp_path / "sh" / shards[0])
    with pytest.raises(FileNotFoundError, match=f"index.json lists shards.*{shards[0]}"):
        hf.load_hf(str(tmp_path / "sh"), tok)
    make_llama(tmp_path / "ix", shard=True)  # an index that is JSON, but not an object
    (tmp_path / "ix" / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"index.json: no weight_map"):
        hf.load_hf(str(tmp_path / "ix"), tok)
    make_llama(tmp_path / "tr", shard=True)
    victim = tmp_path / "tr" / shards[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shards[1]}: unreadable safetensors"):
        hf.load_hf(str(tmp_path / "tr"), tok)
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "Unigram"}, "normalizer": None}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a byte-level BPE"):
        get_tokenizer(f"hf:{tmp_path / 'sp'}")

# --------------------------------------------------------------------------------------------------
# train.py end to end: continued pretraining from an hf: checkpoint, export, FSDP

@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfrun")
    make_llama(root / "llama")
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(TRAIN_TEXT[i * 350:(i + 1) * 350] + " " + SAMPLE)
    name = f"hf:{root / 'llama'}"
    data.prepare(str(root / "*.txt"), str(root / "data"), name)
    return root, name

def hf_run_args(data_dir, out_dir, **overrides):
    settings = dict(data_dir=data_dir, out_dir=out_dir, block_size=32, batch_size=2, max_steps=6,
                    warmup_steps=2, decay_steps=2, objective="mlm", switch_to="none",
                    eval_interval=3, eval_batches=2, lr=1e-3, progress=False) | overrides
    return [f"--{k}={v}" for k, v in settings.items()]

@needs_hf
def test_train_from_hf_then_export(hf_run, tmp_path):
    root, name = hf_run
    with pytest.raises(SystemExit, match="add --tokenizer=hf:"):
        train.main(hf_run_args(str(root / "data"), str(tmp_path), init_from=name))
    train.main(hf_run_args(str(root / "data"), str(tmp_path), init_from=name, tokenizer=name))
    losses = [r["loss"] for r in read_log(tmp_path)[0]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    export.main([f"--init_from={tmp_path / 'ckpt.pt'}"])  # an MLM run: an encoder
    back = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "hf"))
    assert type(back).__name__ == "EuroBertForMaskedLM"
    assert back.config.vocab_size == get_tokenizer(name).n_vocab
    # and the export is an hf: checkpoint train.py continues from, with its own tokenizer
    exported = f"hf:{tmp_path / 'hf'}"
    data.prepare(str(root / "*.txt"), str(tmp_path / "data2"), exported)
    train.main(hf_run_args(str(tmp_path / "data2"), str(tmp_path / "again"), init_from=exported,
                           tokenizer=exported, max_steps=3, warmup_steps=1, decay_steps=1))
    first = read_log(tmp_path / "again")[1][0]
    start = read_log(tmp_path)[1][-1]  # the exported run's last validation, on the same blocks
    # the same weights, except the padding rows past the vocabulary (in the losses' softmax), which
    # the export drops and load_hf refills with the mean row
    assert first["step"] == 0
    for key in ("val_clm", "val_mlm"):
        assert first[key] == pytest.approx(start[key], rel=1e-3)

def torchrun(args, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "train.py"]
    result = subprocess.run(cmd + args, cwd=HERE, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

@needs_hf
def test_fsdp_matches_single_process_and_resumes(hf_run, tmp_path):
    root, name = hf_run
    common = dict(init_from=name, tokenizer=name, batch_size=1, total_batch_size=4, compile="false")
    train.main(hf_run_args(str(root / "data"), str(tmp_path / "one"), **common))
    torchrun(hf_run_args(str(root / "data"), str(tmp_path / "fsdp"), fsdp="true", stop_at=3,
                         **common), 2)
    torchrun(hf_run_args(str(root / "data"), str(tmp_path / "fsdp"),
                         **{**common, "init_from": "resume"}), 2)
    one, two = read_log(tmp_path / "one")[0], read_log(tmp_path / "fsdp")[0]
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    ckpt = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)
    # full tensors, not shards
    assert all(not hasattr(v, "full_tensor") for v in ckpt["model"].values())

@needs_hf
def test_finetune_starts_from_an_hf_decoder(tmp_path):
    """finetune.py --init_from=hf:DIR fine-tunes a Hugging Face decoder as it is, with its own
    tokenizer."""
    make_llama(tmp_path / "llama")
    records = [{"text": f"{SAMPLE[:20]} {word}", "label": word} for word in ["good", "bad"] * 20]
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    test_file = write_jsonl(tmp_path / "test.jsonl", records[:8])
    rep = ft.main([f"--init_from=hf:{tmp_path / 'llama'}", "--task=sc", f"--train={train_file}",
                   f"--test={test_file}", "--lrs=1e-3", "--seeds=1", "--max_steps=2",
                   "--batch_size=8", "--max_len=32", f"--out_dir={tmp_path / 'ft'}",
                   "--progress=False"])
    assert rep["chosen_lr"] == 1e-3 and 0 <= rep["per_lr"][0]["test_mean"] <= 100
