"""
Our checkpoints out as Hugging Face directories (mlm_vs_clm/export.py, through export.export and
`python -m mlm_vs_clm.export`), compared with transformers and sentence-transformers themselves:
the encoder (EuroBertForMaskedLM and its fill-mask pipeline, EuroBertModel, a new classification
head, sentence-transformers' mean pooling), the decoder's kind, fine-tuned models with their heads,
and the bad input export refuses. Tiny random checkpoints with the project's tokenizer; nothing is
downloaded. (The Llama export, and train.py continuing from an export, are in test_hf.py.)
"""

import json
import os

import pytest
import torch

import data
import finetune as ft
from mlm_vs_clm import export, hf
from mlm_vs_clm import tokenizer as hf_tokenizer
import sample
from mlm_vs_clm.checkpoints import checkpoint_payload
from tests.helpers import TOK, make_checkpoint, sc_files
from model import Transformer, model_config
from mlm_vs_clm.tasks import pool
from mlm_vs_clm.tokenizer import get_tokenizer

# Every test but the bad-input ones compares with transformers (or sentence-transformers); one runs
# finetune.py
pytestmark = pytest.mark.slow

try:  # optional: the tests that compare with the Hugging Face libraries skip without them
    import transformers
except ImportError:
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None,
                              reason="needs the Hugging Face libraries: pip install transformers")
SAMPLE = "Hello world! naïve café, 東京 and Ünïcödé 🙂.\n  def f(x):\n\treturn x ** 2  # 12345"
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# --------------------------------------------------------------------------------------------------
# The encoder (EuroBERT)

SENTENCES = ["The encoder sees both sides of the text.", "a decoder looks left only",
             "Return a new list of the items in the sequence, sorted by their key."]
MASKED = ["The value of <|mask|> is returned.", "It returns <|mask|> items of the <|mask|>.",
          "<|mask|> the list"]

def tiny_checkpoint(path, **payload):
    """A tiny random model with the project's tokenizer, EuroBERT's RoPE base (not transformers'
    default) and random norm gains, so that a swapped or missing weight would show."""
    torch.manual_seed(0)
    model = Transformer(model_config("test", vocab_size=TOK.n_vocab, block_size=64,
                                     rope_theta=250000.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    torch.save(checkpoint_payload(model, tokenizer=TOK.meta(), step=7, **payload), path)
    return model.eval(), str(path)

@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    model, ckpt = tiny_checkpoint(root / "ckpt.pt", objective="mlm")
    return model, ckpt, export.export(ckpt, str(root / "hf")).out_dir

def batch(texts):
    """Right-padded ids and the real-token mask, as transformers' tokenizer pads them."""
    seqs = [TOK.encode(t) for t in texts]
    ids = torch.full((len(seqs), max(map(len, seqs))), TOK.pad_id)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, ids != TOK.pad_id

def test_export_kind_follows_the_last_objective(tmp_path, capsys):
    for objective, architecture in (("clm", "LlamaForCausalLM"), ("mlm", "EuroBertForMaskedLM")):
        _, ckpt = tiny_checkpoint(tmp_path / f"{objective}.pt", objective=objective)
        out = export.main([f"--init_from={ckpt}", f"--out_dir={tmp_path / objective}"]).out_dir
        assert json.loads((tmp_path / objective / "config.json").read_text())["architectures"] \
            == [architecture] and architecture in capsys.readouterr().out
        assert os.path.exists(tmp_path / objective / "modules.json") == (objective == "mlm")
        export.export(ckpt, out, kind={"clm": "encoder", "mlm": "decoder"}[objective])
        assert os.path.exists(tmp_path / objective / "modules.json") == (objective == "clm")
    # the command line: any checkpoint file, hf_<name>/ beside it by default
    _, step = tiny_checkpoint(tmp_path / "ckpt_100.pt", objective="mlm")
    export.main([f"--init_from={step}"])
    printed = capsys.readouterr().out
    assert "EuroBertForMaskedLM" in printed and "AutoModelForMaskedLM" in printed
    assert os.path.exists(tmp_path / "hf_ckpt_100" / "model.safetensors")
    card = (tmp_path / "hf_ckpt_100" / "README.md").read_text()  # the model card
    assert "EuroBertForMaskedLM" in card and "## Load it" in card and "<|endoftext|>" in card

@needs_hf
def test_encoder_export_matches_transformers(encoder):
    model, _, out = encoder
    config = json.loads(open(os.path.join(out, "config.json")).read())
    # every field of EuroBertConfig written out, none left to its EuroBERT-210m default
    assert set(transformers.EuroBertConfig.__dataclass_fields__) - {"transformers_version"} \
        <= set(config) | set(transformers.PreTrainedConfig.__dataclass_fields__)
    assert config["rope_parameters"]["rope_theta"] == 250000.0 and config["bos_token_id"] is None
    ids, mask = batch(SENTENCES)
    body = transformers.AutoModel.from_pretrained(out).eval()
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert (type(body).__name__, type(mlm).__name__) == ("EuroBertModel", "EuroBertForMaskedLM")
    with torch.no_grad():
        ours = model(ids, causal=False, attention_mask=mask)  # after the final norm
        theirs = body(ids, attention_mask=mask.long()).last_hidden_state
        # padded positions compute something in both; only the real tokens are compared
        torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-5, rtol=1e-5)
        logits = mlm(ids, attention_mask=mask.long()).logits
        torch.testing.assert_close(logits[mask], model.logits(ours)[mask][:, :TOK.n_vocab],
                                   atol=1e-5, rtol=1e-5)

@needs_hf
def test_fill_mask_pipeline_matches_ours(encoder):
    model, _, out = encoder
    fill = transformers.pipeline("fill-mask", model=out, device="cpu")
    for text in MASKED:
        theirs = fill(text, top_k=5)
        theirs = [theirs] if isinstance(theirs[0], dict) else theirs  # one list per mask
        inputs, _ = sample.masked_text(TOK, text, 0.0, 0)
        # lstrip: "of <|mask|>" gives 'of', '<|mask|>', no stray ' ' token before the mask
        assert fill.tokenizer(text)["input_ids"] == inputs.tolist()
        ours = sample.fill_mask(model, TOK, inputs, top_k=5)
        for at_mask, predicted in zip(theirs, ours):
            assert [p["token"] for p in at_mask] == [i for i, _ in predicted]
            torch.testing.assert_close(torch.tensor([p["score"] for p in at_mask]),
                                       torch.tensor([q for _, q in predicted]),
                                       atol=1e-7, rtol=1e-5)

@needs_hf
def test_sequence_classification_loads_and_trains(encoder):
    _, _, out = encoder
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(out,
                                                                                 num_labels=3)
    assert type(classifier).__name__ == "EuroBertForSequenceClassification"
    assert classifier.config.classifier_pooling == "mean"  # our fine-tuning's default pooling
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    result = classifier(**inputs, labels=torch.tensor([0, 2, 1]))
    result.loss.backward()
    assert result.logits.shape == (3, 3) and torch.isfinite(result.loss)
    grads = [p.grad for p in classifier.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

@needs_hf
def test_encoder_export_imports_back(encoder):
    model, _, out = encoder
    tok = get_tokenizer(f"hf:{out}")
    assert tok.encode(SAMPLE) == TOK.encode(SAMPLE) and tok.special_ids == TOK.special_ids
    assert tok.n_vocab == TOK.n_vocab and tok.base_vocab == TOK.n_vocab  # nothing added
    back = hf.load_hf(out, tok).eval()
    ids, mask = batch(SENTENCES)
    with torch.no_grad():
        for causal in (True, False):
            ref = model.logits(model(ids, causal=causal, attention_mask=mask))[..., :TOK.n_vocab]
            got = back.logits(back(ids, causal=causal, attention_mask=mask))[..., :TOK.n_vocab]
            torch.testing.assert_close(got, ref, atol=0, rtol=0)

@needs_hf
def test_encoder_export_tied_with_llama3_rope(tmp_path):
    torch.manual_seed(0)
    model = Transformer(model_config("test", vocab_size=TOK.n_vocab, block_size=64,
                                     tie_embeddings=True, rope_scaling=LLAMA3_SCALING)).eval()
    torch.save(checkpoint_payload(model, tokenizer=TOK.meta(), objective="mlm"),
               tmp_path / "ckpt.pt")
    out = export.export(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")).out_dir
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    assert mlm.lm_head.weight.data_ptr() == mlm.model.embed_tokens.weight.data_ptr()
    ids, mask = batch(SENTENCES)
    with torch.no_grad():
        ours = model.logits(model(ids, causal=False, attention_mask=mask))[..., :TOK.n_vocab]
        theirs = mlm(ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-5, rtol=1e-5)

@needs_hf
def test_sentence_transformers_mean_pools_our_encoder(encoder):
    st = pytest.importorskip("sentence_transformers")
    model, _, out = encoder
    embedder = st.SentenceTransformer(out, device="cpu")
    got = embedder.encode(SENTENCES, convert_to_tensor=True)
    ids, mask = batch(SENTENCES)
    with torch.no_grad():  # what our fine-tuning pools for retrieval: the mean over real tokens
        ours = pool(model(ids, causal=False, attention_mask=mask), mask, "mean")
    torch.testing.assert_close(got, ours, atol=1e-5, rtol=1e-5)

# Fine-tuned models: a tiny body and a random head of the structure finetune.py saves

class EuroBertHead(torch.nn.Module):
    """EuroBERT's sequence classification head: dense, GELU, classifier, on the pooled vector."""

    def __init__(self, n_embd, n_labels):
        super().__init__()
        self.dense = torch.nn.Linear(n_embd, n_embd)
        self.classifier = torch.nn.Linear(n_embd, n_labels)

    def forward(self, x):
        return self.classifier(torch.nn.functional.gelu(self.dense(x)))

def finetuned(path, family, head, labels=None, pooling="mean", input_format="eot", **extra):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    info = dict(task=f"my_{family}", family=family, labels=labels, pooling=pooling,
                input_format=input_format, head=head.state_dict(), head_type="test", lr=1e-4,
                seed=0, val={"score": 50.0}, test={"score": 40.0}, source="ckpt.pt",
                causal=False, max_len=48) | extra
    model, ckpt = tiny_checkpoint(path, finetuned=info)
    return model, ckpt, head.eval()

def fine_tuning_input(text, input_format):
    """tasks.py's single-text input: the text, and <eot> in the authors' format."""
    return TOK.encode(text) + [TOK.eot_id] * (input_format == "paper")

@needs_hf
@pytest.mark.parametrize("pooling,input_format", [("mean", "paper"), ("first", "eot")])
def test_sequence_classification_export(tmp_path, pooling, input_format):
    model, ckpt, head = finetuned(tmp_path / "model.pt", "sc", EuroBertHead(64, 3),
                                  ["neg", "neutral", 7], pooling, input_format)
    out = export.export(ckpt, str(tmp_path / "hf")).out_dir
    classify = transformers.pipeline("text-classification", model=out, device="cpu")
    assert type(classify.model).__name__ == "EuroBertForSequenceClassification"
    for text in SENTENCES:
        ids = fine_tuning_input(text, input_format)
        assert classify.tokenizer(text)["input_ids"] == ids
        with torch.no_grad():
            ours = head(pool(model(torch.tensor([ids]), causal=False),
                             torch.ones(1, len(ids), dtype=torch.bool), pooling))[0].softmax(-1)
        theirs = {r["label"]: r["score"] for r in classify(text, top_k=None)}
        assert classify(text)[0]["label"] == ["neg", "neutral", "7"][int(ours.argmax())]
        torch.testing.assert_close(torch.tensor([theirs[k] for k in ("neg", "neutral", "7")]),
                                   ours, atol=1e-6, rtol=1e-5)
    if input_format == "eot":  # a pair as this format encodes it: "a <eot> b"
        assert classify.tokenizer("a b", "c d")["input_ids"] == \
            TOK.encode("a b") + [TOK.eot_id] + TOK.encode("c d")
    meta = json.loads((tmp_path / "hf" / "finetuned.json").read_text())
    assert meta["task"] == "my_sc" and meta["labels"] == ["neg", "neutral", 7]
    assert classify.tokenizer.model_max_length == 48  # the fine-tuning's max_len

@needs_hf
def test_token_classification_export(tmp_path):
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    model, ckpt, head = finetuned(tmp_path / "model.pt", "tc", torch.nn.Linear(64, 5), tags,
                                  input_format="paper")
    out = export.export(ckpt, str(tmp_path / "hf")).out_dir
    tagger = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    assert type(tagger).__name__ == "EuroBertForTokenClassification"
    assert [tagger.config.id2label[i] for i in range(5)] == tags
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = inputs["attention_mask"].bool()
    assert inputs["input_ids"][0][mask[0]].tolist() == fine_tuning_input(SENTENCES[0], "paper")
    with torch.no_grad():
        ours = head(model(inputs["input_ids"], causal=False, attention_mask=mask))
        theirs = tagger(**inputs).logits
    torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-5, rtol=1e-5)

@needs_hf
@pytest.mark.parametrize("input_format,causal", [("paper", False), ("eot", False), ("eot", True)])
def test_question_answering_export(tmp_path, input_format, causal):
    model, ckpt, head = finetuned(tmp_path / "model.pt", "qa", torch.nn.Linear(64, 2),
                                  input_format=input_format, causal=causal)
    out = export.export(ckpt, str(tmp_path / "hf")).out_dir
    reader = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    assert type(reader).__name__ == "LlamaForQuestionAnswering"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    question, context = "What does it return?", "It returns a new list of the items."
    # tasks.py's window: its prompt, the context, <eot> (the null answer)
    if input_format == "paper":
        prompt = f"Question: {question}\nContext: "
        ids = TOK.encode(prompt) + TOK.encode(context) + [TOK.eot_id]
    else:
        prompt = question
        ids = TOK.encode(question) + [TOK.eot_id] + TOK.encode(context) + [TOK.eot_id]
    inputs = tokenizer(prompt, context, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    with torch.no_grad():  # a model fine-tuned causal (an ablation) stays causal
        ours = head(model(inputs["input_ids"], causal=causal))
        theirs = reader(**inputs)
    torch.testing.assert_close(theirs.start_logits, ours[..., 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.end_logits, ours[..., 1], atol=1e-5, rtol=1e-5)

@needs_hf
@pytest.mark.parametrize("pooling,input_format",
                         [("mean", "paper"), ("first", "eot"), ("last", "paper")])
def test_retrieval_export_is_a_sentence_transformer(tmp_path, pooling, input_format):
    st = pytest.importorskip("sentence_transformers")
    model, ckpt, _ = finetuned(tmp_path / "model.pt", "ir", torch.nn.Identity(), None, pooling,
                               input_format)
    out = export.export(ckpt, str(tmp_path / "hf")).out_dir
    retriever = st.SentenceTransformer(out, device="cpu")
    for prompt, texts in (("query", SENTENCES[:2]), ("document", SENTENCES)):
        got = retriever.encode(texts, prompt_name=prompt, convert_to_tensor=True)
        # tasks.Retrieval: "Query: "/"Document: " then <eot> in the authors' format
        label = f"{prompt.title()}: " if input_format == "paper" else ""
        seqs = [fine_tuning_input(label + t, input_format) for t in texts] \
            if input_format == "paper" else [TOK.encode(t) for t in texts]
        ids = torch.full((len(seqs), max(map(len, seqs))), TOK.pad_id)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
        mask = ids != TOK.pad_id
        with torch.no_grad():
            ours = torch.nn.functional.normalize(
                pool(model(ids, causal=False, attention_mask=mask), mask, pooling), dim=-1)
        torch.testing.assert_close(got, ours, atol=1e-5, rtol=1e-5)

def test_export_bad_inputs(tmp_path):
    def fails(ckpt, match, **kw):
        with pytest.raises(ValueError, match=match):
            export.export(ckpt, str(tmp_path / "out"), **kw)

    torch.save({"model": {}}, tmp_path / "theirs.pt")
    fails(str(tmp_path / "theirs.pt"), "not a checkpoint of this project")
    _, plain = tiny_checkpoint(tmp_path / "plain.pt")
    fails(plain, r"does not say which objective.*--kind=encoder")
    fails(plain, r"--kind='both': choose one of auto, encoder, decoder", kind="both")
    _, last = finetuned(tmp_path / "last.pt", "sc", EuroBertHead(64, 2), [0, 1], "last")[:2]
    fails(last, r"pools the last token.*--pooling=mean")
    _, old = finetuned(tmp_path / "old.pt", "sc", torch.nn.Linear(64, 2), [0, 1])[:2]
    fails(old, r"single linear layer.*--kind=encoder")
    _, causal = finetuned(tmp_path / "causal.pt", "tc", torch.nn.Linear(64, 2), ["O", "B-X"],
                          causal=True)[:2]
    fails(causal, r"causal attention.*bidirectional only")
    _, wrong = finetuned(tmp_path / "wrong.pt", "tc", torch.nn.Linear(64, 3), ["O", "B-X"])[:2]
    fails(wrong, r"tc head has weights .* expected")
    _, family = finetuned(tmp_path / "family.pt", "ner", torch.nn.Linear(64, 3))[:2]
    fails(family, r"family 'ner'")
    # the head can always be left out
    assert export.export(last, str(tmp_path / "body"), kind="encoder").out_dir
    for argv, match in (([], "--init_from=CHECKPOINT is required"),
                        ([f"--init_from={tmp_path}"], "is a directory"),
                        ([f"--init_from={last}"], "pools the last token")):
        with pytest.raises(SystemExit, match=match):
            export.main(argv)

def test_export_refuses_a_changed_tokenizer(tmp_path):
    """A checkpoint trained with an hf: tokenizer whose files changed since: every id would mean
    another token."""
    model, ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", objective="mlm")
    src = export.export(ckpt, str(tmp_path / "src")).out_dir
    tok = get_tokenizer(f"hf:{src}")
    torch.save(checkpoint_payload(hf.load_hf(src, tok), tokenizer=tok.meta(), objective="mlm"),
               tmp_path / "cpt.pt")
    spec = json.loads((tmp_path / "src" / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] += "|x"
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps(spec))
    data.get_tokenizer.cache_clear()
    hf_tokenizer.hf_tokenizer.cache_clear()
    with pytest.raises(ValueError, match=r"cpt\.pt was trained with the tokenizer hf:.*digest.*"
                                         r"restore the tokenizer files"):
        export.export(str(tmp_path / "cpt.pt"), str(tmp_path / "out"))

@needs_hf
def test_a_model_finetune_py_saved_exports(tmp_path):
    """finetune.py --save_model=true, then the export: transformers' pipeline classifies as ours."""
    ckpt = make_checkpoint(tmp_path / "ckpt.pt")
    train_file, test_file = sc_files(tmp_path)
    ft.main([f"--init_from={ckpt}", "--task=sc", f"--train={train_file}", f"--test={test_file}",
             "--lrs=1e-3", "--seeds=1", "--max_steps=3", "--batch_size=8", "--max_len=32",
             f"--out_dir={tmp_path / 'ft'}", "--save_model=true", "--progress=False"])
    export.main([f"--init_from={tmp_path / 'ft' / 'model.pt'}"])
    classify = transformers.pipeline("text-classification", device="cpu",
                                     model=str(tmp_path / "ft" / "hf_model"))
    saved = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)
    body = Transformer(model_config("test", vocab_size=TOK.n_vocab, block_size=64)).eval()
    body.load_state_dict(saved["model"])
    head = EuroBertHead(64, 2).eval()
    head.load_state_dict(saved["finetuned"]["head"])
    for text in ("the film was good", "a bad plot and a very bad scene"):
        ids = fine_tuning_input(text, saved["finetuned"]["input_format"])
        with torch.no_grad():
            ours = head(body(torch.tensor([ids]), causal=False).mean(1)[0]).softmax(-1)
        theirs = {r["label"]: r["score"] for r in classify(text, top_k=None)}
        labels = [str(label) for label in saved["finetuned"]["labels"]]
        torch.testing.assert_close(torch.tensor([theirs[k] for k in labels]), ours, atol=1e-6,
                                   rtol=1e-5)
