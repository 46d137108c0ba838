"""A fix for torch 2.13 Inductor's `torch.cond`: the branches' inputs keep the strides they were traced with.

Inductor compiles each branch of a `torch.cond` for its operands' traced (fake) strides and asserts them on
entry, but hands the branches the operand buffers in whatever layout it chose for them. When an operand is
a buffer of flexible layout (the `.contiguous()` copy of a transposed view, as WanTransformer3DModel makes of
its patch embedding), Inductor may lay it out transposed, and the branch's entry assertion fails
("expected size 12==12, stride 1==24"). `ir.Conditional.create` realizes the operands without constraining
their strides; the wrapper below first requires each tensor operand to have its traced strides (which fixes
a flexible buffer's layout for free, or copies a view that does not have them), as Inductor already does for
the branches' outputs. Installed once, on import of the cached forward; it only constrains what the branches
already assert. tests/test_compile.py reproduces the failure on a plain torch.cond and checks the fix.
"""

from __future__ import annotations

import functools

from torch._inductor import ir


def _exact_operand_strides(create):
    @functools.wraps(create)
    def wrapped(cls, predicate, true_fn, false_fn, operands):
        from torch._inductor.virtualized import V
        from torch.fx import Node

        fx_operands = V.graph.current_node.args[-1]
        fixed = []
        for operand, fx in zip(operands, fx_operands):
            fake = fx.meta.get("val") if isinstance(fx, Node) else None
            if isinstance(operand, ir.TensorBox) and fake is not None and hasattr(fake, "stride"):
                operand = ir.ExternKernel.require_exact_strides(operand, fake.stride())
            fixed.append(operand)
        return create.__func__(cls, predicate, true_fn, false_fn, fixed)

    wrapped._teacache_fix = True
    return classmethod(wrapped)


def install() -> None:
    if not getattr(ir.Conditional.create, "_teacache_fix", False):
        ir.Conditional.create = _exact_operand_strides(ir.Conditional.create)
