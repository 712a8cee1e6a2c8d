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

    @classmethod
    def from_string(cls, einsum_str: str, kernel_shape: tuple[int, ...]) -> "EinsumOp":
        """Parses ``"lhs,kernel->out"``; raises `UnsupportedLayerError` for batch-like kernel axes."""
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
        odd = [c for c in kernel if c not in in_letters + out_letters]
        if odd or _ELLIPSIS in kernel:
            raise errors.UnsupportedLayerError(
                f"einsum {einsum_str!r}: kernel axes {odd or ['...']} are neither purely contracted "
                "nor purely output axes; a low-rank factorisation needs each kernel axis to be one "
                "or the other")
        size = dict(zip(kernel, kernel_shape))
        return cls(in_shape=tuple(size[c] for c in in_letters),
                   out_shape=tuple(size[c] for c in out_letters),
                   lhs=lhs, kernel=kernel, out=out, in_letters=in_letters, out_letters=out_letters)

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
        size = dict(zip(self.in_letters + self.out_letters, self.in_shape + self.out_shape))
        return tuple(size[c] for c in self.kernel)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.einsum(_spec(f"{self.lhs},{self.kernel}->{self.out}"), x, kernel)

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        r = self._rank_letter
        return jnp.einsum(_spec(f"{self.lhs},{self.in_letters}{r}->{self._hidden}{r}"), x, a)

    def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
        r = self._rank_letter
        return jnp.einsum(_spec(f"{self._hidden}{r},{r}{self.out_letters}->{self.out}"), h, b)

    def scale_output(self, y: jax.Array, g: jax.Array) -> jax.Array:
        return jnp.einsum(_spec(f"{self.out},{self.out_letters}->{self.out}"), y, g)
