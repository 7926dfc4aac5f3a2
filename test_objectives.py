"""
The tests of the two pretraining objectives (objectives.py) and of the model (model.py): CPU only,
tiny models, nothing downloaded. Every other part of the project is tested under tests/; `python
-m pytest` runs both (pytest.ini).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model as M
import objectives as O
from tests.helpers import VOCAB, random_tokens, tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread gains nothing, and on a busy machine the threads of
    each small op wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# --------------------------------------------------------------------------------------------------
# MLM masking

@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4, 0.5])
def test_mask_ratio_statistics(ratio):
    tokens = random_tokens((100, 1000), specials_every=10)  # 100k tokens, 20% special
    inputs, labels = O.mask_tokens(tokens, VOCAB, ratio, generator=torch.Generator().manual_seed(1))
    selected = labels != O.IGNORE
    maskable = ~torch.isin(tokens, torch.tensor(VOCAB.special_ids))
    frac = selected.sum().item() / maskable.sum().item()
    sd = math.sqrt(ratio * (1 - ratio) / maskable.sum().item())
    assert abs(frac - ratio) < 5 * sd  # within 5 standard deviations: ~0.008 at 80k tokens
    assert not (selected & ~maskable).any(), "a special token was selected"
    # labels are the original token exactly where selected, ignored everywhere else
    assert torch.equal(labels[selected], tokens[selected])
    assert (labels[~selected] == O.IGNORE).all()
    # the paper's rule: every selected token becomes <|mask|>, nothing else changes
    assert (inputs[selected] == VOCAB.mask_id).all()
    assert torch.equal(inputs[~selected], tokens[~selected])

def test_bert_replacement_split():
    tokens = random_tokens((200, 1000), specials_every=10)
    inputs, labels = O.mask_tokens(tokens, VOCAB, 0.5, "bert",
                                   generator=torch.Generator().manual_seed(2))
    selected = labels != O.IGNORE
    n = selected.sum().item()
    masked = (inputs == VOCAB.mask_id) & selected
    unchanged = (inputs == tokens) & selected
    other = selected & ~masked & ~unchanged
    # a random replacement can draw the original token (1 chance in 125), which then counts as
    # unchanged
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(unchanged.sum().item() / n - (0.1 + 0.1 / 125)) < 0.01
    assert abs(other.sum().item() / n - 0.1 * 124 / 125) < 0.01
    assert not torch.isin(inputs[other], torch.tensor(VOCAB.special_ids)).any(), \
        "random token was special"
    assert torch.equal(inputs[~selected], tokens[~selected])

def test_masking_is_reproducible_from_a_seed():
    tokens = random_tokens((4, 64))
    a = O.mask_tokens(tokens, VOCAB, 0.4, "bert", generator=torch.Generator().manual_seed(3))
    b = O.mask_tokens(tokens, VOCAB, 0.4, "bert", generator=torch.Generator().manual_seed(3))
    c = O.mask_tokens(tokens, VOCAB, 0.4, "bert", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])

# --------------------------------------------------------------------------------------------------
# Losses

def test_clm_loss_matches_reference():
    model, tokens = tiny_model(), random_tokens((3, 40), specials_every=16)
    loss, n = O.pretraining_loss(model, tokens, "clm", VOCAB)
    logits = model.logits(model(tokens[:, :-1], causal=True))
    targets = tokens[:, 1:].clone()
    targets[targets == VOCAB.pad_id] = -100
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                          ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-6)
    assert n.item() == (targets != -100).sum().item() == 3 * 39 - 3 * 3  # pads at 1, 17, 33

def test_sparse_mlm_loss_equals_dense():
    model, tokens = tiny_model(), random_tokens((3, 48), specials_every=12)
    loss, n = O.pretraining_loss(model, tokens, "mlm", VOCAB,
                                 generator=torch.Generator().manual_seed(5))
    inputs, labels = O.mask_tokens(tokens, VOCAB, 0.4, generator=torch.Generator().manual_seed(5))
    logits = model.logits(model(inputs, causal=False))  # every position through the head
    dense = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=O.IGNORE)
    assert torch.allclose(loss, dense, atol=1e-6)
    assert n.item() == (labels != O.IGNORE).sum().item() > 0
    # and the gradients agree too
    loss.backward()
    sparse_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    dense.backward()
    assert torch.allclose(sparse_grad, model.lm_head.weight.grad, atol=1e-6)

def test_mlm_uses_bidirectional_attention_and_clm_causal():
    calls = []
    model = tiny_model()
    model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["causal"]),
                                    with_kwargs=True)
    O.pretraining_loss(model, random_tokens((2, 16)), "clm", VOCAB)
    O.pretraining_loss(model, random_tokens((2, 16)), "mlm", VOCAB)
    assert calls == [True, False]

# --------------------------------------------------------------------------------------------------
# The fused LM head and loss, and a micro-step that never waits for the host

@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_linear_cross_entropy_equals_the_full_logits(dtype, tolerance):
    """Chunk by chunk, with the gradients computed in the forward pass: the same loss and gradients
    as F.cross_entropy on the whole (tokens x vocabulary) logits, in fp32 and under bf16."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)  # 300 rows: ten chunks of 32 and a rest
    weight = (0.1 * torch.randn(1000, 32)).requires_grad_()
    labels = torch.randint(0, 1000, (300,)).masked_fill(torch.rand(300) < 0.3, O.IGNORE)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss, n = O.linear_cross_entropy(hidden, weight, labels)
        ours = torch.autograd.grad(loss, (hidden, weight))
        full = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=O.IGNORE,
                               reduction="sum")
        reference = torch.autograd.grad(full, (hidden, weight))
    assert n.item() == (labels != O.IGNORE).sum().item()
    assert torch.allclose(loss, full, rtol=tolerance)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item())

class Watch(TorchDispatchMode):
    """Every aten op a block of code runs, and the largest tensor it creates."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func.overloadpacket.__name__, args))
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out

@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_a_micro_step_never_waits_for_the_host_nor_builds_full_logits(objective):
    """Forward and backward of a micro-step: no op that needs the host to see a device value
    (nonzero, item, masked_select, boolean indexing), and no tensor as large as tokens x
    vocabulary; the static-size gather of the masked positions is nonzero_static."""
    model = M.Transformer(M.model_config("test", vocab_size=1000))
    vocab = O.Vocab(size=1000, mask_id=998, special_ids=(997, 998, 999), pad_id=999)
    tokens = torch.randint(0, 997, (4, 64))
    draws = O.mask_draws(tokens.shape, "bert", torch.Generator().manual_seed(0))
    with Watch() as watch:
        loss, n = O.pretraining_loss(model, tokens, objective, vocab, draws=draws,
                                     mask_replace="bert")
        (loss * n).backward()
    syncing = [op for op, args in watch.ops if op in ("nonzero", "item", "_local_scalar_dense",
                                                      "masked_select", "is_nonzero")
               or (op.startswith("index") and any(
                   isinstance(a, (list, tuple)) and any(getattr(i, "dtype", None) == torch.bool
                                                        for i in a) for a in args))]
    assert syncing == []
    assert watch.largest < tokens.numel() * 1000
    assert ("nonzero_static" in [op for op, _ in watch.ops]) == (objective == "mlm")

@pytest.mark.parametrize("bad, message", [
    (dict(objective="mlmm"), "objective"),
    (dict(mask_ratio=0.0), "mask_ratio"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_replace="random"), "mask_replace"),
    (dict(tokens=torch.tensor([[1]]), objective="clm"), "length"),
    (dict(tokens=torch.ones(5, dtype=torch.long)), "batch, length"),
    (dict(tokens=torch.ones(2, 5)), "integer"),
])
def test_bad_input_is_a_clear_error(bad, message):
    args = dict(tokens=random_tokens((2, 8)), objective="mlm", mask_ratio=0.4,
                mask_replace="mask") | bad
    with pytest.raises(ValueError, match=message):
        O.pretraining_loss(tiny_model(), args.pop("tokens"), args.pop("objective"), VOCAB, **args)

# --------------------------------------------------------------------------------------------------
# The model

def test_causal_flag_controls_what_a_position_sees():
    model = tiny_model()
    a = random_tokens((1, 20))
    b = a.clone()
    b[0, 12] = (b[0, 12] + 1) % 100  # change one token in the "future" of positions 0..11
    for attention in ("sdpa", "manual"):
        model.config.attention = attention  # the attention path is read at call time
        with torch.no_grad():
            ca, cb = model(a, causal=True), model(b, causal=True)
            ba, bb = model(a, causal=False), model(b, causal=False)
        assert torch.allclose(ca[0, :12], cb[0, :12], atol=1e-6), "causal: the past saw the future"
        assert not torch.allclose(ca[0, 12:], cb[0, 12:], atol=1e-4)
        assert not torch.allclose(ba[0, :12], bb[0, :12], atol=1e-4), \
            "bidirectional: the past did not see it"

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_and_manual_attention_agree(causal, padded):
    sdpa, manual = tiny_model(seed=1), tiny_model(seed=1, attention="manual")
    tokens = random_tokens((3, 24))
    mask = None
    if padded:
        mask = torch.ones(3, 24, dtype=torch.bool)
        mask[1, 15:] = False
        mask[2, 20:] = False
    out_s, out_m = sdpa(tokens, causal, mask), manual(tokens, causal, mask)
    assert torch.allclose(out_s, out_m, atol=1e-5)
    out_s.square().mean().backward()
    out_m.square().mean().backward()
    for (name, ps), pm in zip(sdpa.named_parameters(), manual.parameters()):
        if name != "lm_head.weight":  # not part of the forward pass
            assert torch.allclose(ps.grad, pm.grad, atol=1e-5 * ps.grad.abs().max()), name

def test_padding_mask_hides_padding():
    model = tiny_model()
    a = random_tokens((1, 16))
    b = a.clone()
    b[0, 10:] = 3  # different padding content
    mask = torch.arange(16).unsqueeze(0) < 10
    with torch.no_grad():
        ha, hb = model(a, False, mask), model(b, False, mask)
    assert torch.allclose(ha[0, :10], hb[0, :10], atol=1e-6)

def test_rope_scores_depend_only_on_the_offset():
    D = 16
    cos, sin = M.rope_tables(D, 64, 10000.0)
    q, k = torch.randn(D), torch.randn(D)

    def score(i, j):  # query at position i, key at position j, both rotated by their own position
        return (M.apply_rope(q, cos[i], sin[i]) @ M.apply_rope(k, cos[j], sin[j])).item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(0, 0) == pytest.approx(score(50, 50), abs=1e-5) == \
        pytest.approx((q @ k).item(), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    # a rotation keeps the norm
    assert M.apply_rope(q, cos[7], sin[7]).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)

def test_gqa_equals_full_attention_with_repeated_kv():
    gqa = tiny_model(seed=2)  # test preset: 4 query heads, 2 KV heads
    full = tiny_model(seed=2, n_kv_head=4)
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (2 KV heads * 16, 64) -> (4 heads * 16, 64)
            state[name] = w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    full.load_state_dict(state)
    tokens = random_tokens((2, 20))
    for causal in (True, False):
        assert torch.allclose(gqa(tokens, causal), full(tokens, causal), atol=1e-5)

@pytest.mark.parametrize("preset, paper_size", [("210m", 212e6), ("610m", 608e6), ("1b", 1.19e9)])
def test_preset_sizes_match_the_paper(preset, paper_size):
    with torch.device("meta"):  # counts parameters without allocating them
        model = M.Transformer(M.model_config(preset, vocab_size=128_256))
    n = model.num_params()
    assert abs(n["paper"] - paper_size) / paper_size < 0.01
    # 128,256 is already a multiple of 64
    assert n["total"] == sum(p.numel() for p in model.parameters())
    assert model.config.head_dim == {"210m": 64, "610m": 64, "1b": 96}[preset]

def test_vocab_is_padded_and_tied_embeddings_share_weights():
    cfg = M.model_config("test", vocab_size=8195)
    assert cfg.padded_vocab_size == 8256
    tied = M.Transformer(M.model_config("test", vocab_size=100, tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed.weight
    n = tied.num_params()
    assert n["lm_head"] == 0 and n["total"] == n["paper"]

def test_init_and_no_biases():
    model = M.Transformer(M.model_config("tiny", vocab_size=8195))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert (model.norm.weight == 1).all()

def test_flops_per_token_convention():
    model = tiny_model()
    n = model.num_params()
    C, L, V = model.config.n_embd, model.config.n_layer, model.config.padded_vocab_size
    assert model.flops_per_token(32, causal=False) == 6 * n["body"] + 6 * V * C + 12 * L * C * 32
    # causal attention costs half; an MLM head on 40% of positions costs 40% of the head
    assert model.flops_per_token(32, causal=True) == 6 * n["body"] + 6 * V * C + 6 * L * C * 32
    assert model.flops_per_token(32, causal=False, head_fraction=0.4) == pytest.approx(
        6 * n["body"] + 0.4 * 6 * V * C + 12 * L * C * 32)

def test_optimizer_decays_matrices_only():
    model = tiny_model()
    opt = M.configure_optimizer(model, lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and \
        all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-5

@pytest.mark.parametrize("bad", [dict(n_head=3), dict(n_kv_head=3), dict(attention="flash"),
                                 dict(n_embd=60)])
def test_bad_model_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="bad ModelConfig"):
        M.model_config("test", vocab_size=100, **bad)
    with pytest.raises(ValueError, match="unknown model preset"):
        M.model_config("7b", vocab_size=100)
