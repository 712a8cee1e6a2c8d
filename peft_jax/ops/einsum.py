"""Einsum layers: ``y = einsum("lhs,kernel->out", x, W)``."""

from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp

from peft_jax import errors
from peft_jax.ops.base import LinearOp

_ELLIPSIS = "."  # "..." is handled as one token, written as "."


def _tokens(spec: str) -> str:
    return spec.replace("...", _ELLIPSIS)


def _spec(tokens: str) -> str:
    return tokens.replace(_ELLIPSIS, "...")


@dataclasses.dataclass(frozen=True)
class EinsumOp(LinearOp):
    """An einsum layer whose kernel axes are each either contracted (in) or kept (out).

    Example:
        >>> import jax.numpy as jnp
        >>> op = EinsumOp.from_string("btd,dnh->btnh", (8, 2, 4))
        >>> op.in_shape, op.out_shape
        ((8,), (2, 4))
        >>> op.project_out(op.project_in(jnp.ones((1, 3, 8)), jnp.ones((8, 5))), jnp.ones((5, 2, 4))).shape
        (1, 3, 2, 4)
    """

    lhs: str = ""
    kernel: str = ""
    out: str = ""
    in_letters: str = ""
    out_letters: str = ""
    batch_letters: str = ""
    batch_shape: tuple[int, ...] = ()

    @classmethod
    def from_string(cls, einsum_str: str, kernel_shape: tuple[int, ...]) -> "EinsumOp":
        """Parses ``"lhs,kernel->out"``.

        Kernel axes that are also in the input and the output (``e`` in ``"etd,edf->etf"``, a
        stack of experts) are *batch* axes: each batch entry gets its own factors. Kernel axes
        that are summed away, or ``...`` in the kernel, raise `UnsupportedLayerError`.
        """
        compact = _tokens(einsum_str.replace(" ", ""))
        try:
            inputs, out = compact.split("->")
            lhs, kernel = inputs.split(",")
        except ValueError:
            raise errors.UnsupportedLayerError(
                f"einsum {einsum_str!r} is not of the form 'input,kernel->output'; "
                "only two-operand einsum layers can be adapted") from None
        if len(kernel) != len(kernel_shape):
            raise errors.UnsupportedLayerError(
                f"einsum {einsum_str!r} names {len(kernel)} kernel axes but the kernel has shape "
                f"{tuple(kernel_shape)}")
        in_letters = "".join(c for c in kernel if c in lhs and c not in out)
        out_letters = "".join(c for c in kernel if c in out and c not in lhs)
        batch_letters = "".join(c for c in kernel if c in lhs and c in out)
        odd = [c for c in kernel if c not in in_letters + out_letters + batch_letters]
        if odd or _ELLIPSIS in kernel or not in_letters or not out_letters:
            raise errors.UnsupportedLayerError(
                f"einsum {einsum_str!r}: kernel axes {odd or ['...']} are summed away (or the kernel "
                "has no contracted or no output axis); a low-rank factorisation needs every kernel "
                "axis to be contracted, an output axis, or a batch axis kept in input and output")
        size = dict(zip(kernel, kernel_shape))
        return cls(in_shape=tuple(size[c] for c in in_letters),
                   out_shape=tuple(size[c] for c in out_letters),
                   lhs=lhs, kernel=kernel, out=out, in_letters=in_letters, out_letters=out_letters,
                   batch_letters=batch_letters, batch_shape=tuple(size[c] for c in batch_letters))

    @property
    def batched(self) -> bool:
        """Whether the kernel is a stack (e.g. of experts) with its own factors per entry."""
        return bool(self.batch_letters)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.batch_shape, *self.in_shape, rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.batch_shape, rank, *self.out_shape)

    def factors_to_kernel(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if not self.batched:
            return super().factors_to_kernel(a, b)
        r, batch = self._rank_letter, self.batch_letters
        spec = f"{batch}{self.in_letters}{r},{batch}{r}{self.out_letters}->{self.kernel}"
        return jnp.einsum(_spec(spec), a, b)

    @property
    def _rank_letter(self) -> str:
        used = set(self.lhs + self.kernel + self.out)
        return next(c for c in string.ascii_letters if c not in used)

    @property
    def _hidden(self) -> str:
        # input axes that survive into the output (batch, sequence, "...")
        return "".join(c for c in self.lhs if c in self.out)

    def _perm(self) -> tuple[int, ...]:
        return tuple(self.kernel.index(c) for c in self.in_letters + self.out_letters)

    def kernel_to_matrix(self, kernel: jax.Array) -> jax.Array:
        return jnp.transpose(kernel, self._perm()).reshape(self.fan_in, self.fan_out)

    def matrix_to_kernel(self, matrix: jax.Array) -> jax.Array:
        ordered = matrix.reshape(*self.in_shape, *self.out_shape)
        inverse = tuple(self._perm().index(i) for i in range(len(self.kernel)))
        return jnp.transpose(ordered, inverse)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        size = dict(zip(self.batch_letters + self.in_letters + self.out_letters,
                        self.batch_shape + self.in_shape + self.out_shape))
        return tuple(size[c] for c in self.kernel)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.einsum(_spec(f"{self.lhs},{self.kernel}->{self.out}"), x, kernel)

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        r, batch = self._rank_letter, self.batch_letters
        return jnp.einsum(_spec(f"{self.lhs},{batch}{self.in_letters}{r}->{self._hidden}{r}"), x, a)

    def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
        r, batch = self._rank_letter, self.batch_letters
        return jnp.einsum(_spec(f"{self._hidden}{r},{batch}{r}{self.out_letters}->{self.out}"), h, b)

    def scale_output(self, y: jax.Array, g: jax.Array) -> jax.Array:
        return jnp.einsum(_spec(f"{self.out},{self.out_letters}->{self.out}"), y, g)
