"""The bn_relu op family (csrc/bn_relu.{cpp,cu}, common/ops.py) against the pure-PyTorch composition
F.batch_norm [+ residual] + relu: outputs, every gradient, running stats, eval mode, the SyncBN split, opcheck,
gradcheck, torch.compile, the BatchNormAct2d fused branch and a whole PSPNet step.

Tolerances: fp64 1e-10; fp32 1e-5 (5e-5 on gradients); fp16 2e-3 and bf16 1.6e-2 relative+absolute on values of
order 1 (half an ulp of the output, 2^-11 / 2^-8, plus the reference's own rounding), compared with an fp32/fp64
reference fed the same (already rounded) half inputs.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import common
import jit_build
from common import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BN_OPS = ("bn_stats", "bn_apply", "bn_relu_train", "bn_relu", "bn_backward_reduce", "bn_backward_apply")


@pytest.fixture(scope="module", autouse=True)
def bn_ops():
    """The ops under test: common._C when built (CI: it is, and a build lacking them fails here), else a JIT build
    of our own sources (dev boxes, where building common._C in place is not allowed). Never a skip. Returns the
    JIT library's path (None for common._C)."""
    if common.extension_loaded():
        ops.require(*BN_OPS)
        return None
    build = os.environ.get("SEG_BN_DEV_BUILD", "/tmp/segfp16_dev_bn")
    sources = ["ops.cpp", "build_info.cpp"] + sorted(f for f in os.listdir(os.path.join(ROOT, "csrc"))
                                                      if f.startswith("bn_relu") and f.endswith(".cpp"))
    jit_build.load(build, name="segfp16_dev_bn", sources=[os.path.join(ROOT, "csrc", f) for f in sources],
                   extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                   is_python_module=False)
    ops.register_bn_relu()
    ops.require(*BN_OPS)
    return os.path.join(build, "segfp16_dev_bn.so")  # for subprocesses (test_isa_variants_bitwise_equal)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
GTOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=5e-5, rtol=5e-5),
        torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def reference(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5, residual=None,
              relu=True):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def make(shape, dtype, device, cl=False, mean=0.5, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def params(C, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    b = (torch.randn(C, generator=g) * 0.5).to(device)
    return w, b


def run_both(x, residual, relu, steps, training, w, b, wdtype, stats=None):
    """`steps` forward+backward passes of ours and the reference (fp32/fp64 math on the same inputs)."""
    rdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    C, dev = x.shape[1], x.device
    if stats is None:  # [ours, reference] x [running_mean, running_var]
        stats = [[torch.zeros(C, dtype=wdtype, device=dev), torch.ones(C, dtype=wdtype, device=dev)] for _ in range(2)]
    out = []
    for step in range(steps):
        g = make(x.shape, x.dtype, dev, seed=10 + step)
        res = []
        for k, (fn, cast) in enumerate(((ops.bn_relu, x.dtype), (reference, rdt))):
            xi = x.detach().to(cast).requires_grad_()
            wi = w.detach().to(wdtype if fn is ops.bn_relu else rdt).requires_grad_()
            bi = b.detach().to(wi.dtype).requires_grad_()
            ri = residual.detach().to(cast).requires_grad_() if residual is not None else None
            y = fn(xi, wi, bi, stats[k][0], stats[k][1], training, 0.1, 1e-5, ri, relu)
            y.backward(g.to(cast))
            res.append((y, xi.grad, wi.grad, bi.grad, ri.grad if ri is not None else None))
        out.append(res)
    return out, stats


def assert_close(a, b, tol):
    torch.testing.assert_close(a.to(b.dtype), b, **tol)


CASES = [  # (shape, channels_last): odd C, batch 1, 1x1 spatial with N > 1, 3-D, a 1x1 map of batch 2
    ((2, 5, 3, 4), False), ((2, 5, 3, 4), True), ((1, 3, 5, 7), False), ((1, 3, 5, 7), True),
    ((4, 6, 1, 1), False), ((4, 6, 1, 1), True), ((3, 7, 6), False), ((2, 16, 4, 4), True), ((2, 16, 8, 8), False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,cl", CASES)
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False), (False, False)])
def test_train_steps_then_eval(device, shape, cl, residual, relu):
    """3 training steps (outputs, grads of x/weight/bias/residual, running stats), then eval, in fp32."""
    x = make(shape, torch.float32, device, cl)
    w, b = params(shape[1], device)
    r = make(shape, torch.float32, device, cl, mean=0.0, std=1.0, seed=5) if residual else None
    out, stats = run_both(x, r, relu, 3, True, w, b, torch.float32)
    for ours, ref in out:
        for a, e in zip(ours, ref):
            if e is not None:
                assert_close(a, e, GTOL[torch.float32])
    if cl and len(shape) == 4 and shape[2] * shape[3] > 1:
        assert out[0][0][0].is_contiguous(memory_format=torch.channels_last)
    assert_close(stats[0][0], stats[1][0], TOL[torch.float32])
    assert_close(stats[0][1], stats[1][1], TOL[torch.float32])
    ev, _ = run_both(x, r, relu, 1, False, w, b, torch.float32, stats)
    for a, e in zip(*ev[0]):
        if e is not None:
            assert_close(a, e, GTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cl", [False, True])
def test_dtypes(device, dtype, cl):
    """Half inputs with fp32 weight and stats (BN under autocast): output and dx in x's dtype, dweight fp32."""
    shape = (2, 16, 6, 5)
    x = make(shape, dtype, device, cl)
    r = make(shape, dtype, device, cl, mean=0.0, std=1.0, seed=5)
    w, b = params(16, device)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    out, stats = run_both(x, r, True, 2, True, w, b, wdtype)
    for ours, ref in out:
        assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == wdtype
        for a, e in zip(ours, ref):
            assert_close(a, e, GTOL[dtype] if a is not ours[0] else TOL[dtype])
    rtol = TOL[dtype] if dtype == torch.float64 else TOL[torch.float32]
    assert_close(stats[0][0], stats[1][0], rtol)
    assert_close(stats[0][1], stats[1][1], rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_large_mean_stats(device):
    """Two-pass statistics: fp16 values around 1000 with unit spread (sum of squares in fp32 would cancel)."""
    x = make((4, 8, 16, 16), torch.float16, device, mean=1000.0, std=1.0)
    mean, m2 = ops.bn_stats(x)
    xd = x.double()
    n = xd.numel() // 8
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(m2.double() / n, xd.var((0, 2, 3), unbiased=False), atol=0, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["transposed", "channel_slice", "channels_last_slice", "expanded_grad"])
def test_non_contiguous(device, kind):
    base = make((2, 12, 5, 6), torch.float32, device)
    if kind == "transposed":
        x = base.transpose(2, 3)  # (2, 12, 6, 5), strides of neither layout
    elif kind == "channel_slice":
        x = base[:, ::2]  # every other channel
    else:
        x = base.contiguous(memory_format=torch.channels_last)[:, 3:9]
    w, b = params(x.shape[1], device)
    xs, xr = x.detach().requires_grad_(), x.detach().clone().requires_grad_()
    y = ops.bn_relu(xs, w, b, None, None, True)
    e = reference(xr, w, b, None, None, True)
    torch.testing.assert_close(y, e, **TOL[torch.float32])
    if kind == "expanded_grad":  # a stride-0 incoming gradient (what y.sum() sends back)
        y.sum().backward()
        e.sum().backward()
    else:
        g = make(y.shape, torch.float32, device, seed=3).transpose(0, 1).contiguous().transpose(0, 1)
        y.backward(g)
        e.backward(g)
    torch.testing.assert_close(xs.grad, xr.grad, **GTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_module_momentum_none_and_num_batches_tracked(device):
    """BatchNormAct2d fused vs torch: cumulative average (momentum None), num_batches_tracked, state-dict keys."""
    from common import layers
    torch.manual_seed(0)
    mods = {}
    for kind in ("torch", "fused"):
        m = layers.BatchNormAct2d(6, relu=True, momentum=None).to(device)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        mods[kind] = m
    mods["fused"].load_state_dict(mods["torch"].state_dict())
    old = layers.KERNELS
    try:
        for step in range(4):
            x = make((2, 6, 3, 3), torch.float32, device, cl=step % 2 == 1, seed=step)
            res = make((2, 6, 3, 3), torch.float32, device, seed=20 + step)
            ys = {}
            for kind, m in mods.items():
                layers.KERNELS = kind
                ys[kind] = m(x, residual=res)
            torch.testing.assert_close(ys["fused"], ys["torch"], **TOL[torch.float32])
        for kind, m in mods.items():
            layers.KERNELS = kind
            m.eval()
            ys[kind] = m(x)
        torch.testing.assert_close(ys["fused"], ys["torch"], **TOL[torch.float32])
    finally:
        layers.KERNELS = old
    a, b = mods["fused"].state_dict(), mods["torch"].state_dict()
    assert list(a) == list(b) and int(a["num_batches_tracked"]) == 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_split_halves_as_syncbn(device):
    """Ranks of 3, 1 and 0 images: per-rank bn_stats, merged statistics, bn_apply; backward sums added across ranks
    (the all-reduce), per-rank bn_backward_apply. Must equal one whole-batch bn_relu (the SyncBN contract)."""
    x = make((4, 6, 3, 5), torch.float32, device, mean=3.0)
    r = make((4, 6, 3, 5), torch.float32, device, seed=7)
    w, b = params(6, device)
    g = make((4, 6, 3, 5), torch.float32, device, seed=8)
    xs, rs, gs = x.split([3, 1, 0]), r.split([3, 1, 0]), g.split([3, 1, 0])
    st = [ops.bn_stats(xi) for xi in xs]
    count = torch.tensor([xi.numel() // 6 for xi in xs], dtype=torch.float32, device=device)
    # Chan et al.'s parallel merge of (mean, M2, count) over ranks; an empty rank drops out
    means, m2s, n = torch.stack([s[0] for s in st]), torch.stack([s[1] for s in st]), count.sum()
    mean = (count[:, None] / n * means).sum(0)
    m2 = m2s.sum(0) + (count[:, None] * (means - mean) ** 2).sum(0)
    invstd = torch.rsqrt(m2 / n + 1e-5)
    ys = [ops.bn_apply(xi, mean, invstd, w, b, ri, True) for xi, ri in zip(xs, rs)]
    red = [ops.bn_backward_reduce(gi, yi, xi, mean, invstd, True) for gi, yi, xi in zip(gs, ys, xs)]
    s_dz, s_dz_xhat = sum(t[0] for t in red), sum(t[1] for t in red)  # the all-reduce
    bwd = [ops.bn_backward_apply(gi, yi, xi, mean, invstd, w, s_dz / n, s_dz_xhat / n, True, True)
           for gi, yi, xi in zip(gs, ys, xs)]

    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    e = reference(xr, wr, br, None, None, True, residual=rr)
    e.backward(g)
    torch.testing.assert_close(torch.cat(ys), e, **TOL[torch.float32])
    torch.testing.assert_close(torch.cat([d[0] for d in bwd]), xr.grad, **GTOL[torch.float32])
    torch.testing.assert_close(torch.cat([d[1] for d in bwd]), rr.grad, **GTOL[torch.float32])
    torch.testing.assert_close(s_dz_xhat, wr.grad, **GTOL[torch.float32])
    torch.testing.assert_close(s_dz, br.grad, **GTOL[torch.float32])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cl,residual,relu", [(False, True, True), (True, True, True), (True, False, False),
                                              (False, False, True)])
def test_gradcheck_fp64(training, cl, residual, relu):
    x = make((3, 4, 2, 3), torch.float64, "cpu", cl).requires_grad_()
    w, b = (p.double().requires_grad_() for p in params(4, "cpu"))
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    args = (x, w, b) + ((make(x.shape, torch.float64, "cpu", cl, seed=4).requires_grad_(),) if residual else ())

    def f(x, w, b, *r):
        return ops.bn_relu(x, w, b, rm.clone(), rv.clone(), training, residual=r[0] if r else None, relu=relu)

    assert torch.autograd.gradcheck(f, args)


def opcheck_samples(device, dtype=torch.float32):
    """Samples for every op; activations in dtype, weights and statistics fp32 (BN under autocast for a half dtype)."""
    x = make((2, 5, 3, 4), torch.float32, device, cl=True).to(dtype)
    xn = make((3, 4, 5), torch.float32, device).to(dtype)
    w, b = params(5, device)
    inv = torch.rand(5, device=device) + 0.5
    mean = torch.randn(5, device=device)
    dy, y = (make(x.shape, torch.float32, device, cl=True, seed=3).to(dtype),
             make(x.shape, torch.float32, device, seed=4).to(dtype))
    T = torch.ops.segfp16
    # bn_stats and the backward pair are not differentiable (no autograd registration): samples without grad
    return [
        (T.bn_stats, (x,)), (T.bn_stats, (xn,)),
        (T.bn_apply, (x.detach().requires_grad_(), mean, inv, w.detach().requires_grad_(), b.detach().requires_grad_(),
                      dy.detach().requires_grad_(), True)),
        (T.bn_apply, (x.detach(), mean, inv, w.detach(), b.detach(), None, False)),
        (T.bn_relu_train, (x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_(),
                           dy.detach().requires_grad_(), 1e-5, True)),
        (T.bn_relu_train, (xn, params(4, device)[0], params(4, device)[1], None, 1e-3, False)),
        (T.bn_relu, (x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_(),
                     mean.clone(), inv.clone(), dy.detach().requires_grad_(), 0.1, 1e-5, True)),
        (T.bn_relu, (xn, params(4, device)[0], params(4, device)[1], None, None, None, 0.0, 1e-3, False)),
        (T.bn_backward_reduce, (dy.detach(), y, x.detach(), mean, inv, True)),
        (T.bn_backward_apply, (dy.detach(), y, x.detach(), mean, inv, w.detach(), mean * 0.1, inv * 0.1, True, True)),
        (T.bn_backward_apply, (dy.detach(), y, x.detach(), mean, inv, w.detach(), mean, inv, False, False)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, dtype):
    for op, args in opcheck_samples(device, dtype):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_traces_through(device):
    """torch.compile (aot_eager: fake kernels + autograd registration, no codegen) with the running-stat update."""
    x = make((2, 6, 4, 4), torch.float32, device, cl=True)
    r = make((2, 6, 4, 4), torch.float32, device, seed=2)
    w, b = params(6, device)

    def step(fn, x, w, b, rm, rv):
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        y = fn(x, w, b, rm, rv, True, 0.1, 1e-5, r)
        y.square().sum().backward()
        return y.detach(), x.grad, w.grad, b.grad

    stats = [(torch.zeros(6, device=device), torch.ones(6, device=device)) for _ in range(2)]
    got = step(torch.compile(ops.bn_relu, backend="aot_eager", fullgraph=True), x, w, b, *stats[0])
    want = step(reference, x, w, b, *stats[1])
    for a, e in zip(got + stats[0], want + stats[1]):
        torch.testing.assert_close(a, e, **GTOL[torch.float32])


def test_autograd_is_cpp():
    """The autograd of bn_relu_train and bn_apply is the C++ one (csrc/bn_relu_autograd.cpp): at the tiny maps a
    Python registration costs more than the kernels."""
    x = make((2, 3, 2, 2), torch.float32, "cpu").requires_grad_()
    w, b = params(3, "cpu")
    for training in (True, False):
        y = ops.bn_relu(x, w, b, torch.zeros(3), torch.ones(3), training)
        assert "CppNode" in y.grad_fn.name(), y.grad_fn.name()


@pytest.mark.parametrize("training", [True, False])
def test_no_affine_parameters(training):
    # weight/bias None (affine=False): the wrapper's ones / zeros, against F.batch_norm without them
    x = make((2, 3, 4, 5), torch.float64, "cpu")
    rm, rv = torch.full((3,), 0.3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    got = ops.bn_relu(x, None, None, rm, rv, training)
    torch.testing.assert_close(got, reference(x, None, None, rm2, rv2, training), **TOL[torch.float64])
    torch.testing.assert_close((rm, rv), (rm2, rv2), **TOL[torch.float64])


def test_errors():
    x = make((1, 3, 1, 1), torch.float32, "cpu")
    w, b = params(3, "cpu")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_relu(x, w, b, None, None, True)
    with pytest.raises(TypeError, match="residual dtype"):
        ops.bn_relu(x, w, b, None, None, False, residual=x.double())
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.segfp16.bn_apply(x, w, w, w[:2], b, None, True)
    with pytest.raises(ValueError, match="eval mode needs running_mean and running_var"):
        ops.bn_relu(make((2, 3, 4, 5), torch.float32, "cpu"), w, b, None, None, False)
    with pytest.raises(ValueError, match="momentum=None"):
        ops.bn_relu(make((2, 3, 4, 5), torch.float32, "cpu"), w, b, torch.zeros(3), torch.ones(3), True, None)
    # the op's own checks (the Python wrapper's are above): a residual, dy or y the loops would misread
    x = make((2, 3, 4, 5), torch.float32, "cpu")
    T = torch.ops.segfp16
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        T.bn_apply(x, b, w, w, b, x.double(), True)
    with pytest.raises(RuntimeError, match="residual must have x's shape"):
        T.bn_apply(x, b, w, w, b, x[:, :, :3], True)
    with pytest.raises(RuntimeError, match="dy must have x's dtype"):
        T.bn_backward_reduce(x.half(), x, x, b, w, True)
    with pytest.raises(RuntimeError, match="y must have x's shape"):
        T.bn_backward_apply(x, x[:1], x, b, w, w, b, b, True, True)


def test_pspnet_step_fused_matches_torch():
    """One PSPNet training step (2x3x33x33, CPU) with every BatchNormAct2d fused vs the ATen composition: same loss,
    parameter gradients and running stats. In fp64: at fp32 the count-2 BN of the 1x1 pyramid bin (batch 2) amplifies
    rounding to ~2% of the stem's gradients in either implementation. Upsampling and the loss stay on the torch path
    in both runs, so that this isolates the BN family (tests/test_upsample_ops.py covers those)."""
    import pspnet
    from common import layers
    torch.manual_seed(0)
    model = pspnet.build_model(num_classes=5).train().double()
    img = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    target = torch.randint(0, 5, (2, 33, 33))
    target[:, :4] = 255

    calls = []
    fused_bn_relu = ops.bn_relu

    def counting_bn_relu(*args, **kwargs):
        calls.append(1)
        return fused_bn_relu(*args, **kwargs)

    def step(kind):
        model.zero_grad(set_to_none=True)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        old = layers.KERNELS
        layers.KERNELS = "torch"
        orig_forward = layers.BatchNormAct2d.forward

        def bn_forward(self, x, residual=None):  # only the BN unit sees `fused`
            layers.KERNELS = kind
            try:
                return orig_forward(self, x, residual)
            finally:
                layers.KERNELS = "torch"

        layers.BatchNormAct2d.forward = bn_forward
        ops.bn_relu = counting_bn_relu
        try:
            torch.manual_seed(1)  # the same Dropout2d masks in both runs
            out = model(img)
            loss = sum(layers.seg_cross_entropy(out[k], target) * wgt for k, wgt in (("out", 1.0), ("aux", 0.4)))
            loss.backward()
        finally:
            layers.BatchNormAct2d.forward = orig_forward
            ops.bn_relu = fused_bn_relu
            layers.KERNELS = old
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(saved)
        return loss.detach(), grads, stats

    l_t, g_t, s_t = step("torch")
    assert not calls
    l_f, g_f, s_f = step("fused")
    n_bn = sum(isinstance(m, layers.BatchNormAct2d) for m in model.modules())
    assert len(calls) == n_bn > 50  # every BN unit of backbone and heads ran fused
    torch.testing.assert_close(l_f, l_t, atol=1e-9, rtol=1e-9)
    assert g_f.keys() == g_t.keys() and len(g_t) > 100
    for n in g_t:
        scale = g_t[n].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g_f[n] / scale, g_t[n] / scale, atol=1e-7, rtol=0, msg=lambda m: f"{n}: {m}")
    for k in s_t:
        torch.testing.assert_close(s_f[k], s_t[k], atol=1e-9, rtol=1e-9, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.float16, marks=pytest.mark.cuda)])
def test_autocast_conv_bn_relu(device, dtype):
    """The written autocast decision: under autocast the conv hands us fp16/bf16, weight and stats stay fp32; the
    fused unit then matches the torch unit (which runs F.batch_norm on the same mixed inputs) and returns x's dtype."""
    from common import layers
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False).to(device)
    bns = {k: layers.BatchNormAct2d(8).to(device) for k in ("torch", "fused")}
    bns["fused"].load_state_dict(bns["torch"].state_dict())
    img = torch.randn(2, 3, 9, 9, device=device)
    old, out = layers.KERNELS, {}
    try:
        for kind, bn in bns.items():
            layers.KERNELS = kind
            conv.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype):
                y = bn(conv(img))
            y.float().square().mean().backward()
            out[kind] = (y, conv.weight.grad.clone(), bn.weight.grad.clone(), bn.running_var.clone())
    finally:
        layers.KERNELS = old
    assert out["fused"][0].dtype == dtype and bns["fused"].running_var.dtype == torch.float32
    for a, e in zip(out["fused"], out["torch"]):
        torch.testing.assert_close(a.float(), e.float(), **GTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cl", [False, True])
def test_deterministic(device, cl):
    """Fixed-order reductions (no atomics, chunking independent of the thread count): bitwise-equal reruns."""
    x = make((3, 24, 20, 20), torch.float32, device, cl)
    g = make((3, 24, 20, 20), torch.float32, device, cl, seed=9)
    w, b = params(24, device)
    threads = torch.get_num_threads()

    def run(nthreads):
        torch.set_num_threads(nthreads)
        xi = x.detach().requires_grad_()
        y = ops.bn_relu(xi, w, b, None, None, True)
        y.backward(g)
        return y, xi.grad

    try:
        a, b_ = run(threads), run(1)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(u, v) for u, v in zip(a, b_))


ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.ops.load_library(sys.argv[2]) if sys.argv[2] else __import__("common")
T, out = torch.ops.segfp16, {"isa": torch.ops.segfp16.bn_cpu_isa()}
g = torch.Generator().manual_seed(0)
# NCHW with run tails, NCHW past kFlush values per channel, NCHW small planes, channels_last rows, 1x1 [N, C] rows
for shape, cl in (((3, 5, 6, 7), False), ((2, 3, 97, 97), False), ((4, 9, 3, 3), False), ((2, 20, 9, 11), True),
                  ((4, 21, 1, 1), False)):
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x, r, dy = (torch.randn(shape, generator=g, dtype=torch.float64).to(dt) for _ in range(3))
        if cl:
            x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
        acc = torch.float64 if dt == torch.float64 else torch.float32
        w, b = (torch.randn(shape[1], generator=g, dtype=acc) for _ in range(2))
        key = f"{shape}-{cl}-{dt}"
        mean, m2 = out[key + "-stats"] = T.bn_stats(x)
        inv = torch.rsqrt(m2 / (x.numel() // shape[1]) + 1e-5)
        out[key + "-train"] = T.bn_relu_train(x, w, b, r, 1e-5, True)
        y = T.bn_apply(x, mean, inv, w, b, None, True)
        out[key + "-apply"] = (y,)
        out[key + "-bred"] = T.bn_backward_reduce(dy, y, x, mean, inv, True)
        out[key + "-bred-norelu"] = T.bn_backward_reduce(dy, y, x, mean, inv, False)
        out[key + "-bapp"] = T.bn_backward_apply(dy, y, x, mean, inv, w, mean, inv, True, True)
torch.save(out, sys.argv[3])
"""


def test_isa_variants_bitwise_equal(bn_ops, tmp_path):
    """The CPU loops are compiled per instruction set (csrc/bn_relu_cpu.h); every variant this CPU runs must give
    the same bits as the baseline one (same summation order, no FMA contraction) on every op, dtype and loop shape.
    The variants the CPU lacks are reported, not run."""
    import subprocess
    import sys
    results, lacking = {}, []
    for isa in ("base", "avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT, ROOT, bn_ops or "", str(path)], capture_output=True,
                              text=True, env={**os.environ, "SEGFP16_CPU_ISA": isa})
        if proc.returncode and "cannot run it" in proc.stderr:
            lacking.append(isa)
            continue
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[isa] = torch.load(path)
        assert results[isa].pop("isa") == isa
    assert "base" in results
    print(f"ISA variants compared: {sorted(results)}; not runnable on this CPU: {lacking}")
    for isa, got in results.items():
        for key, want in results["base"].items():
            assert all(torch.equal(a, e) for a, e in zip(got[key], want)), f"{isa} differs from base: {key}"


def test_isa_choice_errors(bn_ops, tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT, ROOT, bn_ops or "", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, env={**os.environ, "SEGFP16_CPU_ISA": "sse9"})
    assert proc.returncode != 0 and "SEGFP16_CPU_ISA=sse9: expected base, avx2 or avx512" in proc.stderr


@pytest.mark.parametrize("training", [False, True])
def test_eps_is_the_callers(training):
    """A BN with eps 0.1 (ours all use 1e-5): train and eval normalise with the given eps, as F.batch_norm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    w, b = torch.rand(4, generator=g, dtype=torch.float64) + 0.5, torch.randn(4, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64) + 0.1
    want = F.relu(F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 0.1))
    got = ops.bn_relu(x, w, b, rm.clone(), rv.clone(), training, momentum=0.1, eps=0.1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_residual_grad_with_frozen_affine():
    """The residual's gradient follows its own requires_grad, not the BN parameters' (frozen weight and bias)."""
    x = make((2, 4, 3, 5), torch.float32, "cpu")
    w, b = params(4, "cpu")
    r = make(x.shape, torch.float32, "cpu", mean=0.0, std=1.0, seed=5)
    g = make(x.shape, torch.float32, "cpu", seed=6)
    rs, rr = r.clone().requires_grad_(), r.clone().requires_grad_()
    ops.bn_relu(x, w, b, None, None, True, residual=rs).backward(g)
    reference(x, w, b, None, None, True, residual=rr).backward(g)
    assert rs.grad is not None
    torch.testing.assert_close(rs.grad, rr.grad, **GTOL[torch.float32])


LAYOUTS = {"nchw": ((2, 8, 4, 4), False), "small_planes": ((2, 8, 3, 3), False), "channels_last": ((2, 8, 4, 4), True)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_passes_relu_and_its_mask(layout):
    """A NaN pre-activation comes out of the ReLU as NaN (torch.relu), and a NaN y lets its gradient through the
    mask (ATen's threshold_backward zeroes only where y <= 0), in each loop shape of csrc/bn_relu_cpu_loops.h."""
    shape, cl = LAYOUTS[layout]
    T = torch.ops.segfp16
    x = make(shape, torch.float32, "cpu", cl)
    x[1, 3, 2, 1] = float("nan")
    dy = make(shape, torch.float32, "cpu", cl, seed=3)
    w, b = params(8, "cpu")
    mean, inv = torch.zeros(8), torch.ones(8)
    y = T.bn_apply(x, mean, inv, w, b, None, True)
    assert y[1, 3, 2, 1].isnan() and y.isnan().sum() == 1
    _, dres = T.bn_backward_apply(dy, y, x, mean, inv, w, mean, mean, True, True)
    assert dres[1, 3, 2, 1] == dy[1, 3, 2, 1] != 0
    sum_dz, _ = T.bn_backward_reduce(dy, y, x, mean, inv, True)
    torch.testing.assert_close(sum_dz, torch.where(y <= 0, 0.0, dy).sum((0, 2, 3)), **TOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_store_rounds_ties_to_even(layout):
    """The hand-written float -> bf16 store (st in csrc/bn_relu_cpu_loops.h) rounds as c10 does: to nearest, ties
    to even. x + residual is made exactly halfway between two bf16 values (half an ulp of x added, either sign;
    exact in float), and the result must have the bits of torch's own conversion."""
    shape, cl = LAYOUTS[layout]
    x = make(shape, torch.bfloat16, "cpu", cl)
    x = torch.where(x.abs() < 2 ** -20, torch.ones_like(x), x)
    e = torch.exp2(torch.floor(torch.log2(x.float().abs())))  # x = m * e with 1 <= |m| < 2
    sign = torch.where(make(shape, torch.float32, "cpu", cl, seed=4) < 0, -1.0, 1.0)
    sign = torch.where(x.float().abs() == e, torch.sign(x.float()), sign)  # below a power of two the ulp halves
    r = (sign * e * 2.0 ** -8).to(torch.bfloat16)  # half an ulp of x
    C = shape[1]
    y = torch.ops.segfp16.bn_apply(x, torch.zeros(C), torch.ones(C), torch.ones(C), torch.zeros(C), r, False)
    want = (x.float() + r.float()).to(torch.bfloat16)
    assert (want.float() != x.float() + r.float()).all()  # every value is a tie
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))


def test_sums_merged_in_double():
    """The float partials are merged in double (csrc/bn_relu_cpu_loops.h): partials 2^24, 1, -2^24 (each exact in
    float) give exactly 1, where a float merge gives 0 (2^24 + 1 rounds to 2^24). NCHW: one flush per image of
    16384 values; channels_last: one partial per 256 rows."""
    T = torch.ops.segfp16
    for cl, shape in ((False, (3, 1, 128, 128)), (True, (3, 2, 16, 16))):
        x = torch.empty(shape)
        per = x[0].numel() // shape[1]  # values per channel and image
        for n, part in enumerate((2.0 ** 24, 1.0, -(2.0 ** 24))):
            x[n] = part / per  # a power of two: every float partial of the image is exact
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        count = x.numel() // shape[1]
        mean, _ = T.bn_stats(x)
        s0, _ = T.bn_backward_reduce(x, x, torch.zeros_like(x), torch.zeros(shape[1]), torch.ones(shape[1]), False)
        assert (s0 == 1.0).all(), (cl, s0)
        assert (mean == torch.tensor(1.0) / count).all(), (cl, mean)


def test_channels_last_sums_independent_of_threads():
    """channels_last sums with more chunks (256 rows each) than threads, each chunk a task (C >= 128): each chunk
    fills its own partial, so the bits do not depend on the thread count (test_deterministic's maps are one task)."""
    x = make((5, 128, 16, 16), torch.float32, "cpu", cl=True)
    dy = make(x.shape, torch.float32, "cpu", cl=True, seed=2)
    w, b = params(128, "cpu")
    threads = torch.get_num_threads()
    T, out = torch.ops.segfp16, []
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            mean, m2 = T.bn_stats(x)
            inv = torch.rsqrt(m2 / 1280 + 1e-5)
            y = T.bn_apply(x, mean, inv, w, b, None, True)
            out.append((mean, m2) + T.bn_backward_reduce(dy, y, x, mean, inv, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, e) for a, e in zip(*out))


def test_default_isa_is_the_best_this_cpu_runs():
    """Without SEGFP16_CPU_ISA the widest variant the CPU runs is picked (csrc/bn_relu.cpp: cpu_loops): its flags
    from /proc/cpuinfo, as __builtin_cpu_supports reads them."""
    if os.environ.get("SEGFP16_CPU_ISA"):
        pytest.skip("SEGFP16_CPU_ISA is set: this process runs the variant it names")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    avx2 = {"avx2", "fma", "f16c"} <= flags
    want = "avx512" if avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else "avx2" if avx2 else "base"
    assert torch.ops.segfp16.bn_cpu_isa() == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_on_half_x_takes_the_fp32_running_stats_in_float(dtype):
    """eval under autocast / --eval_amp: half x with fp32 running stats. invstd is computed in float, so a
    running_var beyond fp16's range (65504) or below bf16's precision still normalises (test_dtypes trains only)."""
    x = make((2, 4, 3, 3), torch.float32, "cpu", mean=0.0, std=300.0).to(dtype)
    w, b = params(4, "cpu")
    rm = torch.tensor([100.0, 0.0, 0.1, -50.0])
    rv = torch.tensor([7e4, 1.0, 1.0001, 9e4])
    y = ops.bn_relu(x, w, b, rm, rv, False, relu=False)
    assert y.dtype == dtype
    ref = reference(x.float(), w, b, rm, rv, False, relu=False)
    assert_close(y.float(), ref, GTOL[dtype])
