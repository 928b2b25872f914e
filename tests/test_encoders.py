"""State encoders: shapes, padding behaviour, feedback features, meta-device construction."""
from __future__ import annotations

import pytest
import torch

from mtrec_dist.config import ModelConfig
from mtrec_dist.models.encoders import build_encoder

torch.set_num_threads(1)
NAMES = ["sasrec", "gru4rec", "caser", "nextitnet"]
D = 8


def cfg(**kw) -> ModelConfig:
    base = dict(embedding_dim=D, num_layers=2, num_heads=2, dropout=0.0, caser_h_filters=3, caser_v_filters=2,
                nextitnet_dilations=[1, 2])
    base.update(kw)
    return ModelConfig(**base)


def inputs(b=5, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 10, (b, L), generator=g)
    items[0] = 0  # empty state
    items[1, :2] = 0  # left padding
    emb = torch.randn(b, L, D, generator=g) * (items != 0).unsqueeze(-1)
    fb = torch.rand(b, L, generator=g) * (items != 0)
    return emb, fb, items != 0


@pytest.mark.parametrize("name", NAMES)
def test_shape_finite_and_gradients(name):
    torch.manual_seed(0)
    enc = build_encoder(name, cfg(), state_len=4)
    emb, fb, valid = inputs()
    emb.requires_grad_(True)
    h = enc(emb, fb, valid)
    assert h.shape == (5, D) and torch.isfinite(h).all()
    h.pow(2).sum().backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_padding_positions_do_not_leak(name):
    """What sits in the embedding of a padding position must not change the output."""
    torch.manual_seed(0)
    enc = build_encoder(name, cfg(), state_len=4).eval()
    emb, fb, valid = inputs()
    noisy = emb + torch.randn_like(emb) * (~valid).unsqueeze(-1)
    noisy_fb = fb + torch.rand_like(fb) * (~valid)
    assert torch.allclose(enc(emb, fb, valid), enc(noisy, noisy_fb, valid), atol=1e-6)


@pytest.mark.parametrize("name", ["gru4rec", "nextitnet"])
def test_left_padding_is_inert(name):
    """GRU (masked updates) and NextItNet (causal zero padding) give the same h for [0,0,x,y] and [x,y]."""
    torch.manual_seed(0)
    enc4 = build_encoder(name, cfg(), state_len=4).eval()
    enc2 = build_encoder(name, cfg(), state_len=2).eval()
    enc2.load_state_dict(enc4.state_dict())
    emb = torch.randn(3, 2, D)
    fb = torch.rand(3, 2)
    padded = torch.cat([torch.zeros(3, 2, D), emb], 1)
    pfb = torch.cat([torch.zeros(3, 2), fb], 1)
    valid4 = torch.tensor([[False, False, True, True]]).expand(3, -1)
    assert torch.allclose(enc4(padded, pfb, valid4), enc2(emb, fb, torch.ones(3, 2, dtype=torch.bool)), atol=1e-5)


@pytest.mark.parametrize("name", ["sasrec", "nextitnet"])
def test_sees_the_most_recent_item(name):
    torch.manual_seed(0)
    enc = build_encoder(name, cfg(), state_len=4).eval()
    emb, fb, valid = inputs()
    changed = emb.clone()
    changed[:, -1] += torch.randn(D)  # (not a constant shift: LayerNorm would remove that)
    assert not torch.allclose(enc(emb, fb, valid)[2:], enc(changed, fb, valid)[2:])


@pytest.mark.parametrize("name", NAMES)
def test_feedback_features_used_only_when_enabled(name):
    torch.manual_seed(0)
    emb, fb, valid = inputs()
    on = build_encoder(name, cfg(feedback_features=True), state_len=4).eval()
    off = build_encoder(name, cfg(feedback_features=False), state_len=4).eval()
    fb2 = fb + 0.7 * valid
    assert not torch.allclose(on(emb, fb, valid)[2:], on(emb, fb2, valid)[2:])
    assert torch.allclose(off(emb, fb, valid), off(emb, fb2, valid))


@pytest.mark.parametrize("name", NAMES)
def test_meta_construction_then_materialise(name):
    enc = build_encoder(name, cfg(), state_len=4, device=torch.device("meta"))
    assert all(p.is_meta for p in enc.parameters())
    enc = enc.to_empty(device="cpu")
    for m in enc.modules():  # what DistributedModelParallel does for meta-built modules
        if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    emb, fb, valid = inputs()
    assert torch.isfinite(enc.eval()(emb, fb, valid)).all()


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("lstm", cfg(), state_len=4)


@pytest.mark.parametrize("layers", [1, 2])
def test_fused_gru_state_is_the_stepwise_one(layers):
    """One fused GRU call over each row's valid steps equals stepping position by position and skipping the
    padding, for left padding, gaps anywhere, a row of padding only and a full row; gradients too."""
    from mtrec_dist.models.encoders import stepwise_gru_state

    torch.manual_seed(0)
    enc = build_encoder("gru4rec", cfg(num_layers=layers), state_len=6).eval()
    emb = torch.randn(5, 6, D, requires_grad=True)
    fb = torch.rand(5, 6)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1],
                          [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    fused = enc(emb, fb, valid)
    reference = enc.out(stepwise_gru_state(enc.gru, enc.inp(emb, fb, valid), valid))
    assert torch.allclose(fused, reference, atol=1e-5)
    g_fused, = torch.autograd.grad(fused.pow(2).sum(), emb)
    g_ref, = torch.autograd.grad(reference.pow(2).sum(), emb)
    assert torch.allclose(g_fused, g_ref, atol=1e-5)


@pytest.mark.parametrize("out_len", [1, 4, 9])
@pytest.mark.parametrize("kernel, dilation", [(3, 1), (3, 2), (2, 5)])
def test_causal_conv_computes_the_last_out_len_outputs(kernel, dilation, out_len):
    """``out_len`` gives the last ``out_len`` outputs of the whole causal convolution, whether they read only
    inside the input (1, 4 with a short reach) or past its start (9), gradients included."""
    from mtrec_dist.models.encoders import causal_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(5, 7, kernel, dilation=dilation)
    x = torch.randn(3, 9, 5, requires_grad=True)
    want = causal_conv(x, conv.weight, conv.bias, dilation)[:, 9 - out_len:]
    got = causal_conv(x, conv.weight, conv.bias, dilation, out_len)
    assert got.shape == (3, out_len, 7) and torch.allclose(got, want, atol=1e-6)
    g_want, = torch.autograd.grad(want.sum(), x)
    g_got, = torch.autograd.grad(got.sum(), x)
    assert torch.allclose(g_got, g_want, atol=1e-6)


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (3, 4), (2, 3), (1, 2), (3, 30)])
def test_causal_conv_is_a_left_padded_conv1d(kernel, dilation):
    """The channels-last 2-D convolution equals nn.Conv1d on the left-padded channels-first input (the
    textbook causal convolution), gradients included; a dilation past the sequence's start reads zeros."""
    from mtrec_dist.models.encoders import causal_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(5, 7, kernel, dilation=dilation)
    x = torch.randn(3, 9, 5, requires_grad=True)
    want = conv(torch.nn.functional.pad(x.transpose(1, 2), ((kernel - 1) * dilation, 0))).transpose(1, 2)
    got = causal_conv(x, conv.weight, conv.bias, dilation)
    assert got.shape == (3, 9, 7) and torch.allclose(got, want, atol=1e-5)
    g_want, = torch.autograd.grad(want.sum(), x)
    g_got, = torch.autograd.grad(got.sum(), x)
    assert torch.allclose(g_got, g_want, atol=1e-5)


def test_caser_horizontal_filters_are_the_papers_2d_convolutions():
    """Caser's horizontal filters, run as 1-D convolutions over positions, give the 2-D convolutions of the
    L x D image that its parameters describe (relu, max over positions), gradients included."""
    torch.manual_seed(0)
    enc = build_encoder("caser", cfg(), state_len=5).eval()
    emb = torch.randn(3, 5, D, requires_grad=True)
    fb, valid = torch.rand(3, 5), torch.ones(3, 5, dtype=torch.bool)
    img = enc.inp(emb, fb, valid).unsqueeze(1)
    out_v = enc.conv_v(img).reshape(3, -1)
    out_h = [torch.relu(conv(img).squeeze(3)).amax(dim=2) for conv in enc.conv_h]
    want = enc.out(torch.relu(enc.fc(torch.cat([out_v, *out_h], dim=1))))
    got = enc(emb, fb, valid)
    assert torch.allclose(got, want, atol=1e-5)
    g_want, = torch.autograd.grad(want.sum(), emb)
    g_got, = torch.autograd.grad(got.sum(), emb)
    assert torch.allclose(g_got, g_want, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_sasrec_last_block_computes_only_the_position_it_returns(layers):
    """The last block's output at the last position alone equals the full block's last position."""
    torch.manual_seed(0)
    enc = build_encoder("sasrec", cfg(num_layers=layers), state_len=4).eval()
    emb, fb, valid = inputs()
    keep = valid.unsqueeze(-1).float()
    x = (enc.inp(emb, fb, valid) * enc.scale + enc.pos[:4]) * keep
    mask = (torch.ones(4, 4, dtype=torch.bool).tril() & valid.unsqueeze(1)) | torch.eye(4, dtype=torch.bool)
    for block in enc.blocks:
        x = block(x, mask) * keep  # every position, every block
    assert torch.allclose(enc(emb, fb, valid), enc.final_norm(x[:, -1]), atol=1e-5)


def _textbook_nextitnet(enc, emb, fb, valid):
    """Every block on every position, with nn.Conv1d on the left-padded channels-first input."""
    keep = valid.unsqueeze(-1).to(emb.dtype)
    x = enc.inp(emb, fb, valid)
    for block in enc.blocks:
        y = x
        for conv, ln in ((block.conv1, block.ln1), (block.conv2, block.ln2)):
            pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
            y = conv(torch.nn.functional.pad(y.transpose(1, 2), (pad, 0))).transpose(1, 2)
            y = torch.relu(ln(y)) * keep
        x = x + y
    return enc.out(x[:, -1])


@pytest.mark.parametrize("length, dilations, kernel", [
    (50, [1, 2, 4], 3), (10, [1, 2], 3), (7, [1, 3], 2), (1, [1, 2], 3), (20, [2, 4], 3), (16, [3, 6, 1], 4)])
def test_nextitnet_computes_only_what_its_last_position_reads(length, dilations, kernel):
    """The windowed blocks (each computing only the positions the last output depends on) give the textbook
    NextItNet's output and gradients, for left padding, gaps and an all-padding row."""
    torch.manual_seed(0)
    enc = build_encoder("nextitnet", cfg(nextitnet_dilations=dilations, nextitnet_kernel=kernel),
                        state_len=length).eval()
    emb = torch.randn(6, length, D, requires_grad=True)
    fb = torch.rand(6, length)
    valid = torch.rand(6, length) > 0.3
    valid[0] = False
    valid[1, : length // 2] = False
    got, want = enc(emb, fb, valid), _textbook_nextitnet(enc, emb, fb, valid)
    assert torch.allclose(got, want, atol=1e-5)
    params = [emb, *enc.parameters()]
    for g_got, g_want in zip(torch.autograd.grad(got.pow(2).sum(), params),
                             torch.autograd.grad(want.pow(2).sum(), params)):
        assert torch.allclose(g_got, g_want, atol=1e-5)


def test_nextitnet_windows_by_hand():
    """Length 50, kernel 3, dilations (1, 2, 4) x 2, walked back from position 49.  Last block (d=4): output 49
    only; conv2 (dilation 8) reads 33, 41, 49 (stride 8, 3); conv1 (dilation 4) reads those minus 0, 4, 8:
    25..49 at stride gcd(8, 4) = 4 (7).  Block d=2 delivers those 7: conv2 (dilation 4) reads 17..49 at
    stride 4 (7 - 1 + 1 + 2 = 9), conv1 (dilation 2) 13..49 at stride gcd(4, 2) = 2 (8 * 2 + 1 + 2 = 19).
    Block d=1 delivers 13..49 at stride 2: conv2 (dilation 2) reads 9..49 at stride 2 (21), conv1 (dilation
    1) 7..49 (20 * 2 + 1 + 2 = 43).  Block d=4 delivers 7..49; its convolutions read all 50.  In all 100 +
    100 + 93 + 40 + 16 + 4 = 353 of 600 convolution outputs."""
    from mtrec_dist.models.conv_windows import ConvWindow, nextitnet_windows

    full = ConvWindow(1, 50, 1, 50, 1, 50)
    windows = nextitnet_windows(50, 3, (1, 2, 4, 1, 2, 4))
    assert windows == (full, full, ConvWindow(1, 50, 1, 50, 1, 43), ConvWindow(1, 43, 2, 21, 2, 19),
                       ConvWindow(2, 19, 4, 9, 4, 7), ConvWindow(4, 7, 8, 3, 8, 1))
    assert sum(w.n_mid + w.n_out for w in windows) == 353


def _window_positions(length, stride, count):
    return {length - 1 - k * stride for k in range(count)}


def _dependency_sets(length, kernel, dilations):
    """Per block (in order): the positions of its inputs, first convolution's outputs and outputs that the
    last block's last output depends on, built position by position (the residual reads the input at the
    block's output positions)."""
    need, sets = {length - 1}, []
    for d in reversed(dilations):
        mid = {t - k * 2 * d for t in need for k in range(kernel) if t - k * 2 * d >= 0}
        inp = {t - k * d for t in mid for k in range(kernel) if t - k * d >= 0} | need
        sets.append((inp, mid, need))
        need = inp
    return sets[::-1]


def _windows_as_sets(length, kernel, dilations):
    from mtrec_dist.models.conv_windows import nextitnet_windows

    return [(_window_positions(length, w.in_stride, w.n_in), _window_positions(length, w.mid_stride, w.n_mid),
             _window_positions(length, w.out_stride, w.n_out)) for w in nextitnet_windows(length, kernel, dilations)]


def test_nextitnet_windows_cover_the_dependency_sets():
    """Over 2,000 random (length, kernel, dilations), every window holds every position the last output
    depends on; with NextItNet's doubling dilations (powers of 2), exactly those."""
    import random

    rng = random.Random(0)
    for _ in range(2000):
        length, kernel = rng.randint(1, 80), rng.randint(1, 5)
        dilations = tuple(rng.choice([1, 2, 3, 4, 5, 6, 8, 12, 16]) for _ in range(rng.randint(1, 6)))
        for window, deps in zip(_windows_as_sets(length, kernel, dilations), _dependency_sets(length, kernel, dilations)):
            assert all(w >= d for w, d in zip(window, deps)), (length, kernel, dilations)
    for dilations in [(1, 2, 4) * 2, (1, 2, 4, 8), (1, 2, 4, 8) * 2, (2, 4, 8), (1, 4), (1,)]:
        for length in (1, 7, 10, 50, 200):
            for kernel in (2, 3):
                assert _windows_as_sets(length, kernel, dilations) == _dependency_sets(length, kernel, dilations)


def test_nextitnet_windows_random_configurations_in_float64():
    """60 random (length, kernel, unsorted dilations, layers) in float64: the windowed encoder equals the
    textbook computation to 1e-10, output and gradients, including inputs shorter or longer than
    ``state_len``."""
    g = torch.Generator().manual_seed(1)
    for case in range(60):
        pick = lambda hi: int(torch.randint(1, hi + 1, (1,), generator=g))
        length, kernel, layers = pick(40), pick(4) + 1, pick(2)
        dilations = [int(d) for d in torch.tensor([1, 2, 3, 4, 6, 8])[torch.randint(0, 6, (pick(3),), generator=g)]]
        torch.manual_seed(case)
        enc = build_encoder("nextitnet", cfg(nextitnet_dilations=dilations, nextitnet_kernel=kernel,
                                             num_layers=layers), state_len=pick(40)).double().eval()
        emb = torch.randn(3, length, D, dtype=torch.float64, requires_grad=True)
        fb = torch.rand(3, length, dtype=torch.float64)
        valid = torch.rand(3, length) > 0.3
        got, want = enc(emb, fb, valid), _textbook_nextitnet(enc, emb, fb, valid)
        assert torch.allclose(got, want, atol=1e-10), (length, kernel, dilations, layers)
        for g_got, g_want in zip(torch.autograd.grad(got.sum(), [emb, *enc.parameters()]),
                                 torch.autograd.grad(want.sum(), [emb, *enc.parameters()])):
            assert torch.allclose(g_got, g_want, atol=1e-10), (length, kernel, dilations, layers)



def test_attention_without_dropout_is_sdpa():
    from mtrec_dist.models.encoders import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    allowed = torch.rand(2, 1, 5, 6) > 0.4
    allowed[..., 0] = True  # no empty softmax row
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    assert torch.allclose(attention(q, k, v, allowed, 0.0), want, atol=1e-6)


def test_attention_dropout_drops_probabilities_and_rescales():
    """With v the identity the output is the attention probabilities themselves: each is 0 or SDPA's
    probability / (1 - p), disallowed keys stay 0, and about 1 - p of the allowed ones are kept."""
    from mtrec_dist.models.encoders import attention

    torch.manual_seed(0)
    p, keys = 0.3, 8
    q, k = torch.randn(512, 2, 8, 4), torch.randn(512, 2, keys, 4)
    v = torch.eye(keys).expand(512, 2, keys, keys)
    allowed = torch.ones(keys, keys, dtype=torch.bool).tril()
    probs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    got = attention(q, k, v, allowed, p)
    kept = got != 0
    assert torch.allclose(got[kept], probs[kept] / (1 - p), atol=1e-6)
    assert not kept[..., ~allowed].any()
    share = kept[..., allowed].float().mean().item()
    assert abs(share - (1 - p)) < 0.012  # 512 x 2 x 36 allowed entries: 5 standard errors


def test_unsharded_item_lookup_equals_the_keyed_jagged_one():
    """Unsharded, ItemEmbedding looks rows up directly; the KeyedJaggedTensor path (what a sharded table takes)
    gives the same rows and the same gradient, for 2-D and 1-D features alike."""
    import torch.nn as nn

    from mtrec_dist.models.embeddings import ItemEmbedding

    torch.manual_seed(0)
    ids = {"state": torch.randint(0, 30, (4, 5)), "action": torch.randint(1, 30, (4, 1)),
           "catalog": torch.arange(1, 30)}
    fast = ItemEmbedding(30, 6)
    keyed = ItemEmbedding(30, 6)
    keyed.load_state_dict(fast.state_dict())

    calls = []

    class NotPlain(nn.Module):  # any other module type takes the KeyedJaggedTensor path
        def __init__(self, ec):
            super().__init__()
            self.ec, self.embeddings = ec, ec.embeddings

        def forward(self, kjt):
            calls.append(kjt)
            return self.ec(kjt)

    keyed.ec = NotPlain(keyed.ec)
    a, b = fast(ids), keyed(ids)
    assert len(calls) == 1  # the keyed model really went through a KeyedJaggedTensor
    for name, t in ids.items():
        assert a[name].shape == (*t.shape, 6) and torch.equal(a[name], b[name]), name
    sum((o * (i + 1)).sum() for i, o in enumerate(a.values())).backward()
    sum((o * (i + 1)).sum() for i, o in enumerate(b.values())).backward()
    grad = fast.ec.embeddings["item_table"].weight.grad
    assert grad.abs().sum() > 0 and torch.equal(grad, keyed.ec.embeddings["item_table"].weight.grad)
    with pytest.raises(ValueError, match="batch"):  # a batch mismatch fails unsharded too, as sharded
        fast({"state": torch.zeros(4, 5, dtype=torch.long), "action": torch.ones(3, 1, dtype=torch.long)})
