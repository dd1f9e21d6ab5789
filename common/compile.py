"""`--compile none|default|max-autotune`: torch.compile the model's forward, in place, for training and evaluation.

In place (nn.Module.compile): the module keeps its type, parameters and state-dict keys, so checkpoints, DDP, Amp and
common.dist.unwrap see the same object. Only the model's forward is compiled; the loss, amp.backward (the loss
scaler) and amp.step stay eager, outside the compiled region. Our custom ops trace through their fake kernels
(common/ops.py) without graph breaks (tests/test_compile.py checks fullgraph=True on all four models).

Recompilation: training sees one crop size (static shapes). Evaluation images differ in size, so the eval copy is
compiled with dynamic=True: one graph for every image size instead of one per size (max-autotune without its CUDA
graphs there, which would be recorded per size). Duck shaping is off for it:
dynamo would otherwise give H and W of a square first image one symbol, and the first non-square one would compile
a second graph.
"""
import time

MODES = ("none", "default", "max-autotune")


def compile_module(module, mode, log=print, what="train", dynamic=None, backend="inductor", fullgraph=False):
    """module.compile(...) unless mode is 'none'; the first call's time (trace + compile + one run) is logged once."""
    if mode not in MODES:
        raise ValueError(f"--compile {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return module
    if dynamic and mode == "max-autotune":
        # its CUDA graphs are recorded per input shape: with dynamic shapes (the eval copy, a size per val image)
        # that is one graph and memory pool per size, so the dynamic compile keeps the tuning and drops the graphs
        mode = "max-autotune-no-cudagraphs"
    if dynamic:
        import torch.fx.experimental._config as fx_config
        fx_config.use_duck_shape = False  # process-wide; static-shape graphs (training) do not consult it
    module.compile(mode=None if mode == "default" else mode, dynamic=dynamic, backend=backend, fullgraph=fullgraph)
    compiled = module._compiled_call_impl  # what module(...) now calls (nn.Module.compile's attribute)

    def first_call(*args, **kwargs):
        t0 = time.time()
        out = compiled(*args, **kwargs)
        module._compiled_call_impl = compiled  # later calls go straight to the compiled forward
        log(f"compile: {what} forward compiled ({mode}, dynamic={dynamic}) in {time.time() - t0:.1f} s "
            f"(first call: tracing + compiling + one run; a training backward compiles at its first backward)")
        return out

    module._compiled_call_impl = first_call
    return module

