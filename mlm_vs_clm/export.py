"""Our checkpoints as Hugging Face directories that transformers and sentence-transformers load
with no custom code: python -m mlm_vs_clm.export --init_from=CKPT. docs/huggingface.md."""

import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import NamedTuple

from safetensors.torch import save_file

from mlm_vs_clm import files
from mlm_vs_clm.checkpoints import load_model
from mlm_vs_clm.hf import hf_name
from mlm_vs_clm.settings import command, configure, one_of
from mlm_vs_clm.task_data import FAMILIES
from mlm_vs_clm.tokenizer import Tokenizer, bytes_to_unicode

@dataclass
class ExportConfig:
    init_from: str = ""  # the checkpoint: out/run/ckpt.pt, ckpt_<step>.pt, a fine-tuned model.pt
    out_dir: str = ""  # directory to write; "": hf/ beside ckpt.pt, hf_<name>/ beside other files
    kind: str = "auto"  # auto: from the checkpoint (docs/huggingface.md); or encoder, decoder

    def checks(self):
        path = self.init_from
        return [(path != "", "--init_from=CHECKPOINT is required (e.g. out/demo/ckpt.pt)"),
                (path.startswith("hf:") or not os.path.isdir(path),
                 f"--init_from={path} is a directory: give a checkpoint file (ckpt.pt, "
                 "ckpt_<step>.pt, a fine-tuned model.pt); Hugging Face directories need no export"),
                (not path or os.path.isfile(path) or os.path.isdir(path),
                 f"--init_from={path}: no checkpoint at {path}"), *one_of(self, "kind", KINDS)]

KINDS = ("auto", "encoder", "decoder")
MARKER = "mlm_vs_clm_export.json"  # in every export: a directory this code may replace
ST_POOLING = {"mean": "pooling_mode_mean_tokens", "first": "pooling_mode_cls_token",
              "last": "pooling_mode_lasttoken"}  # ours -> sentence-transformers' Pooling mode

class Exported(NamedTuple):
    out_dir: str
    kind: str  # encoder, decoder, sc, tc, qa, ir
    architecture: str  # the transformers class written in config.json
    why: str  # what chose the kind
    input_format: str | None  # a fine-tuned model's (tasks.py): paper or eot

    def usage(self) -> str:
        """What was written and what to load it with."""
        d, paper = repr(self.out_dir), self.input_format == "paper"
        auto = {"sc": "AutoModelForSequenceClassification", "tc": "AutoModelForTokenClassification",
                "qa": "AutoModelForQuestionAnswering"}.get(self.kind)
        how = {
            "encoder": [f"AutoModelForMaskedLM.from_pretrained({d}), or pipeline('fill-mask', "
                        f"model={d})",
                        "AutoModel for the hidden states; AutoModelForSequenceClassification or "
                        "AutoModelForTokenClassification to fine-tune",
                        f"sentence_transformers.SentenceTransformer({d}): mean pooling"],
            "decoder": [f"AutoModelForCausalLM.from_pretrained({d}), or "
                        f"pipeline('text-generation', model={d})"],
            "sc": [f"pipeline('text-classification', model={d}), or {auto}",
                   "as fine-tuned: a pair is one text, a + '\\n' + b; the tokenizer appends <eot>"
                   if paper else "a pair: {'text': a, 'text_pair': b}, encoded 'a <eot> b'"],
            "tc": [f"pipeline('token-classification', model={d}), or {auto}"],
            "qa": [f"{auto}.from_pretrained({d}): start and end logits",
                   "as fine-tuned: tokenizer(f'Question: {question}\\nContext: ', "
                   "context), which appends <eot>" if paper else
                   "as fine-tuned: tokenizer(question, context), 'question <eot> context <eot>'",
                   "null answer: the final <eot>, not 0 as transformers' QA pipeline assumes"],
            "ir": [f"sentence_transformers.SentenceTransformer({d}): the retriever (its pooling, "
                   "then unit norm; cosine or dot product)"]
            + (["encode_query(...) and encode_document(...) add 'Query: ' and 'Document: ' "
                "as in fine-tuning, and the tokenizer appends <eot>"] if paper else []),
        }[self.kind]
        head = f"{self.out_dir}: {self.kind} ({self.why}), written as {self.architecture}"
        return "\n".join([f"{head}; load it with no custom code:", *(f"  {line}" for line in how)])

def templates(kind: str, input_format: str | None) -> tuple[str, str]:
    """(single, pair) templates with which tokenizer(text), tokenizer(a, b) build its inputs."""
    if input_format == "paper":  # the authors': one labelled text, then <eot>
        return "$A <eot>", "$A $B <eot>"  # qa: the pair ("Question: ...\nContext: ", context)
    return "$A", "$A <eot> $B <eot>" if kind == "qa" else "$A <eot> $B"

def choose_kind(ckpt: dict, path: str, kind: str) -> tuple[str, str]:
    """(kind, why) from --kind and what the checkpoint says about itself."""
    if kind not in KINDS:
        raise ValueError(f"--kind={kind!r}: choose one of {', '.join(KINDS)}")
    finetuned = ckpt.get("finetuned")
    if kind != "auto":
        dropped = f"; its fine-tuned {finetuned.get('family')} head is left out" \
            if isinstance(finetuned, dict) else ""
        return kind, f"--kind={kind}{dropped}"
    if finetuned is not None:
        family = finetuned.get("family") if isinstance(finetuned, dict) else None
        if family not in FAMILIES:
            raise ValueError(f"{path}: 'finetuned' has family {family!r}, not one of "
                             f"{', '.join(FAMILIES)}: not a model finetune.py saved")
        if finetuned.get("head_type") == "token_2":  # EncodEval's QA: answer tokens tagged
            return "tc", f"fine-tuned on {finetuned.get('task', family)} as token tagging"
        return family, f"fine-tuned on {finetuned.get('task', family)}"
    if (objective := ckpt.get("objective")) in ("clm", "mlm"):
        kind = "decoder" if objective == "clm" else "encoder"
        return kind, f"its last step trained {objective.upper()}"
    raise ValueError(f"{path} does not say which objective its last step trained (no 'objective' "
                     "entry): choose --kind=encoder (EuroBertForMaskedLM) or --kind=decoder")

def shared_config(cfg, tok) -> dict:
    """The fields Llama's and EuroBERT's configs share. No BOS: pretraining blocks have none."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": None,
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
            "eos_token_id": tok.eot_id, "pad_token_id": tok.pad_id, "mask_token_id": tok.mask_id}

def llama_config(cfg, tok) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shared_config(cfg, tok),
            "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
            "torch_dtype": "float32"}

def eurobert_config(cfg, tok, architecture: str, classifier_pooling: str = "mean") -> dict:
    """Every field of transformers' EuroBertConfig, written out: its defaults are EuroBERT-210m's
    (RoPE theta 10,000 where EuroBERT trained with 250,000, Llama 3's token ids), not ours."""
    rope = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    return {"architectures": [architecture], "model_type": "eurobert", **shared_config(cfg, tok),
            "rope_parameters": {**rope, "rope_theta": cfg.rope_theta}, "attention_dropout": 0.0,
            "pretraining_tp": 1, "use_cache": False, "classifier_pooling": classifier_pooling,
            "dtype": "float32"}

def body_weights(model, prefix: str = "model.", lm_head: bool = True) -> dict:
    """Our weights under transformers' Llama names (EuroBERT's too), without vocabulary padding."""
    cfg, state = model.config, {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and (cfg.tie_embeddings or not lm_head):
            continue
        key = name if name == "lm_head.weight" else prefix + hf_name(name).removeprefix("model.")
        state[key] = (w[:cfg.vocab_size] if name in ("embed.weight", "lm_head.weight")
                      else w).float().contiguous()
    return state

def head_weights(finetuned: dict, family: str, n_embd: int, path: str) -> dict:
    """The fine-tuned head under the names of its transformers class, after checking its shapes."""
    head = finetuned.get("head")
    if not isinstance(head, dict):
        raise ValueError(f"{path}: 'finetuned' has no head weights: not a model finetune.py saved")
    n_labels = len(finetuned.get("labels") or [])
    if family == "sc":  # tasks.SequenceClassifier has transformers' names already
        names = {}
        shapes = {"dense.weight": (n_embd, n_embd), "dense.bias": (n_embd,),
                  "classifier.weight": (n_labels, n_embd), "classifier.bias": (n_labels,)}
        if set(head) == {"weight", "bias"}:
            raise ValueError(f"{path}: its classification head is a single linear layer (an older "
                             "finetune.py), which no transformers class has: fine-tune again for "
                             "EuroBERT's dense-GELU-classifier head, or export with --kind=encoder")
    else:  # one linear layer saved as weight, bias (tc's maybe as classifier.*); qa: start, end
        layer, n_out = ("classifier", n_labels) if family == "tc" else ("qa_outputs", 2)
        plain = family == "qa" or set(head) == {"weight", "bias"}
        names = {(p if plain else f"{layer}.{p}"): f"{layer}.{p}" for p in ("weight", "bias")}
        shapes = {f"{layer}.weight": (n_out, n_embd), f"{layer}.bias": (n_out,)}
    got = {names.get(k, k): v for k, v in head.items()}
    if {k: tuple(getattr(v, "shape", ())) for k, v in got.items()} != shapes:
        found = {k: tuple(getattr(v, "shape", ())) for k, v in head.items()}
        raise ValueError(f"{path}: the fine-tuned {family} head has weights {found}, expected "
                         f"{shapes} ({n_labels} labels): not a head finetune.py saved")
    return {k: v.float().contiguous() for k, v in got.items()}

def label_maps(finetuned: dict, path: str) -> dict:
    labels = finetuned.get("labels")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"{path}: 'finetuned' has no list of labels: not a model finetune saved")
    names = [str(label) for label in labels]  # transformers' id2label values are strings
    return {"id2label": {str(i): s for i, s in enumerate(names)},
            "label2id": {s: i for i, s in enumerate(names)}}

def sentence_transformers_files(out_dir: str, n_embd: int, max_len: int, pooling: str,
                                retriever: bool, paper: bool) -> None:
    """sentence-transformers' module files (2.x to 6.x): model, pooling, a retriever's unit norm."""
    modules = ["Transformer", "Pooling"] + ["Normalize"] * retriever
    paths = ["", "1_Pooling", "2_Normalize"]
    for path in paths[1:len(modules)]:
        os.makedirs(os.path.join(out_dir, path), exist_ok=True)

    def write(name, content):
        files.write_json(os.path.join(out_dir, name), content)
    write("modules.json", [{"idx": i, "name": str(i), "path": paths[i],
                            "type": f"sentence_transformers.models.{m}"}
                           for i, m in enumerate(modules)])
    write("sentence_bert_config.json", {"max_seq_length": max_len, "do_lower_case": False})
    prompts = {"query": "Query: ", "document": "Document: "} if paper else {}  # as fine-tuned
    write("config_sentence_transformers.json", {"prompts": prompts, "default_prompt_name": None,
                                                "similarity_fn_name": "cosine"})
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
             "weightedmean_tokens", "lasttoken")
    write(os.path.join("1_Pooling", "config.json"),
          {"word_embedding_dimension": n_embd, "include_prompt": True,
           **{f"pooling_mode_{m}": f"pooling_mode_{m}" == ST_POOLING[pooling] for m in modes}})

def check_finetuned(finetuned: dict, kind: str, path: str) -> tuple[str, str, int | None]:
    """(pooling, input format, max_len), refusing what transformers cannot load as fine-tuned."""
    if finetuned.get("causal") and kind != "qa":
        raise ValueError(f"{path} was fine-tuned with causal attention; EuroBERT's {kind} class is "
                         "bidirectional only: fine-tune with --causal=false, or use --kind=decoder")
    pooling, input_format = finetuned.get("pooling", "mean"), finetuned.get("input_format", "eot")
    if kind in ("sc", "ir") and pooling not in ST_POOLING:
        raise ValueError(f"{path}: unknown pooling {pooling!r} (mean, first or last)")
    if kind == "sc" and pooling == "last":
        raise ValueError(f"{path} pools the last token, which EuroBertForSequenceClassification "
                         "cannot: fine-tune with --pooling=mean or first, or use --kind=encoder")
    if input_format not in ("paper", "eot"):
        raise ValueError(f"{path}: unknown input format {input_format!r} (paper or eot)")
    max_len = finetuned.get("max_len")
    return pooling, input_format, max_len if isinstance(max_len, int) and max_len > 0 else None

def weights_and_config(model, tok, kind: str, finetuned: dict | None, pooling: str, path: str):
    """(transformers class, config.json, weights) of each kind."""
    cfg = model.config
    if kind == "decoder":
        return "LlamaForCausalLM", llama_config(cfg, tok), body_weights(model)
    if kind in ("encoder", "ir"):
        architecture = "EuroBertForMaskedLM"
        return architecture, eurobert_config(cfg, tok, architecture), body_weights(model)
    head = head_weights(finetuned, kind, cfg.n_embd, path)
    if kind == "qa":
        architecture = "LlamaForQuestionAnswering"
        config = {**llama_config(cfg, tok), "architectures": [architecture]}
        if not finetuned.get("causal"):
            config["is_causal"] = False  # transformers >= 5: a Llama whose attention sees both ways
        return architecture, config, {**body_weights(model, "transformer.", lm_head=False), **head}
    architecture = {"sc": "EuroBertForSequenceClassification",
                    "tc": "EuroBertForTokenClassification"}[kind]
    config = {**eurobert_config(cfg, tok, architecture, {"first": "bos"}.get(pooling, "mean")),
              **label_maps(finetuned, path)}
    if kind == "sc":
        config["problem_type"] = "single_label_classification"
    return architecture, config, {**body_weights(model, lm_head=False), **head}

def export(ckpt_path: str, out_dir: str, kind: str = "auto") -> Exported:
    """One of our checkpoints -> a Hugging Face directory (docs/huggingface.md lists its files)."""
    model, tok, ckpt = load_model(ckpt_path)
    kind, why = choose_kind(ckpt, ckpt_path, kind)
    finetuned = ckpt.get("finetuned") if kind in FAMILIES else None
    pooling, input_format, max_len = check_finetuned(finetuned, kind, ckpt_path) \
        if finetuned is not None else ("mean", None, None)
    arch, config, state = weights_and_config(model, tok, kind, finetuned, pooling, ckpt_path)
    max_len = min(max_len or model.config.block_size, model.config.block_size)
    found = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if found and MARKER not in found:  # a new or empty directory, or one of our exports
        raise ValueError(f"{out_dir} holds files this export did not write ({', '.join(found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}): choose a new or empty --out_dir")
    tmp, old = f"{out_dir.rstrip(os.sep)}.tmp", f"{out_dir.rstrip(os.sep)}.old"
    shutil.rmtree(tmp, ignore_errors=True)  # what an earlier export that failed left
    os.makedirs(tmp)
    try:
        files.write_json(os.path.join(tmp, MARKER), {"checkpoint": ckpt_path, "kind": kind})
        files.write_atomically(os.path.join(tmp, "model.safetensors"),
                               lambda path: save_file(state, path, metadata={"format": "pt"}))
        # model_max_length (truncation, sentence-transformers): fine-tuning's max_len with <eot>
        files.write_json(os.path.join(tmp, "tokenizer_config.json"), {
            "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": tok.token_name(tok.pad_id),
            "eos_token": tok.token_name(tok.eot_id), "mask_token": tok.token_name(tok.mask_id),
            "model_max_length": max_len, "model_input_names": ["input_ids", "attention_mask"]})
        files.write_json(os.path.join(tmp, "config.json"), config)
        files.write_json(os.path.join(tmp, "tokenizer.json"),
                         tokenizer_json(tok, templates(kind, input_format)))
        if kind in ("encoder", "ir"):
            sentence_transformers_files(tmp, model.config.n_embd, max_len, pooling, kind == "ir",
                                        input_format == "paper")
        if finetuned is not None:  # what it was trained on and how well it did, for its users
            keep = ("task", "family", "labels", "pooling", "input_format", "max_len", "causal",
                    "lr", "seed", "val", "test", "source")
            files.write_json(os.path.join(tmp, "finetuned.json"),
                             {k: finetuned[k] for k in keep if k in finetuned})
        done = Exported(out_dir, kind, arch, why, input_format)
        card = model_card(done, model, tok, ckpt)
        files.write_text_atomically(os.path.join(tmp, "README.md"), card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous export, if any, is untouched
        raise
    shutil.rmtree(old, ignore_errors=True)  # the old export moves aside, goes once the new is in
    if os.path.isdir(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return done

def model_card(done: Exported, model, tok, ckpt: dict) -> str:
    """README.md of an export: what it is, how it was trained, how to load it."""
    cfg, params = ckpt.get("train_config") or {}, model.num_params()["paper"] / 1e6
    switch = f", then {cfg['switch_to'].upper()}" if cfg.get("switch_to") in ("clm", "mlm") else ""
    trained = (f"Pretrained with {str(cfg.get('objective', '?')).upper()}{switch} for "
               f"{ckpt.get('step')} of {cfg.get('max_steps')} steps on {cfg.get('data')} "
               f"({cfg.get('tokenizer')} tokenizer)" if cfg else "Pretraining: not recorded")
    finetuned = ckpt.get("finetuned") or {}
    tuned = (f"; fine-tuned on {finetuned.get('task')} (test {finetuned.get('test')})"
             if finetuned else "")
    return (f"# {os.path.basename(os.path.abspath(done.out_dir))}\n\n"
            f"A {params:.1f}M-parameter {done.kind} ({done.architecture}) by the mlm-vs-clm "
            "project, which reproduces *Should We Still Pretrain Encoders with Masked Language "
            f"Modeling?* (arXiv 2507.00994).\n\n{trained}{tuned}.\n\nThe paper's input format, "
            "which its fine-tuning uses: a labelled text, then the end-of-text token (`text + "
            f"'{tok.token_name(tok.eot_id)}'`), pairs on two lines; the tokenizer appends it only "
            f"for a model fine-tuned in this format.\n\n## Load it\n\n```\n{done.usage()}\n```\n")

# A tiktoken Encoding written back as a tokenizers-library tokenizer.json

def _bpe_parts(ranks: dict, token: bytes) -> list[bytes]:
    """BPE of a token's bytes with only the ranks below its own: the two pieces that merge to it."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]

def post_processor(tok: Tokenizer, single: str, pair: str) -> dict:
    """tokenizers' TemplateProcessing of templates (see templates) in words "$A", "$B", "<eot>"."""
    eot = tok.token_name(tok.eot_id)

    def pieces(template):
        return [{"SpecialToken": {"id": eot, "type_id": 0}} if word == "<eot>"
                else {"Sequence": {"id": word.removeprefix("$"), "type_id": 0}}
                for word in template.split()]
    return {"type": "TemplateProcessing", "single": pieces(single), "pair": pieces(pair),
            "special_tokens": {eot: {"id": eot, "ids": [tok.eot_id], "tokens": [eot]}}}

def tokenizer_json(tok: Tokenizer, templates: tuple[str, str] = ("$A", "$A <eot> $B")) -> dict:
    """The Encoding as a byte-level BPE; the mask takes the space before it (lstrip, as RoBERTa)."""
    ranks, chars = tok.encoding._mergeable_ranks, bytes_to_unicode()
    # tokenizers reads `X{1,3}+` (Oniguruma) as `(X{1,3})+`, not possessive as tiktoken does; a
    # bounded repeat that ends its branch never backtracks, so plain `X{1,3}` means the same
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", tok.encoding._pat_str)
    spell = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    merges = []  # a token BPE cannot build from two lower ones is only reachable as a whole piece
    for token in sorted(ranks, key=ranks.get):
        if len(token) > 1 and len(parts := _bpe_parts(ranks, token)) == 2:
            merges.append(" ".join(map(spell, parts)))
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
            "post_processor": post_processor(tok, *templates),
            "added_tokens": [{"id": i, "content": s, "lstrip": i == tok.mask_id, "rstrip": False,
                              "single_word": False, "normalized": False, "special": True}
                             for s, i in tok.encoding._special_tokens.items()],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            # ignore_merges: a piece that is a whole token is that token, as in tiktoken
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "byte_fallback": False, "ignore_merges": True,
                      # tokenizers keeps an added token's id only if the model's vocab has it
                      "merges": merges, "vocab": {spell(t): r for t, r in ranks.items()}
                      | {spell(s.encode()): i for s, i in tok.encoding._special_tokens.items()}}}

@command
def main(argv: list[str]) -> Exported:
    cfg = configure(ExportConfig, argv)
    stem = os.path.splitext(os.path.basename(cfg.init_from))[0]
    default = os.path.join(os.path.dirname(cfg.init_from), "hf" if stem == "ckpt" else f"hf_{stem}")
    done = export(cfg.init_from, cfg.out_dir or default, cfg.kind)
    print(done.usage())
    return done

if __name__ == "__main__":
    main(sys.argv[1:])
