"""Transport plans as the solver returns them: stored in full, or per source patch on a window of target patches.

A :class:`TransportPlan` holds a batch of plans over a source grid (N patches) and a target grid (M patches):
dense values ``[B, N, M]``, or windowed values ``[B, N, K]`` with the :class:`stages.match.windows.Windows`
that say which K target patches each source patch's entries are (every other entry is zero). The readout
works on either without building the ``[B, N, M]`` array; :meth:`TransportPlan.dense` builds it for pictures
and tests. The match stage also carries NN similarities this way (dense), so that its readout takes one type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stages.match.windows import Windows


@dataclass(frozen=True)
class TransportPlan:
    """A batch of plans: ``values [B, N, K]`` at the entries ``windows`` names, or ``[B, N, M]`` (all of
    them, in target order) when ``windows`` is None. ``plan[b]`` is pair ``b``'s plan, a batch of one."""

    values: torch.Tensor
    windows: Windows | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, N, M)``, the dense plans' shape."""
        batch, n, k = self.values.shape
        return batch, n, k if self.windows is None else self.windows.trg_patches

    @property
    def is_windowed(self) -> bool:
        """Whether only windows of the plan are stored."""
        return self.windows is not None

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, pair: int) -> TransportPlan:
        if not -len(self) <= pair < len(self):
            raise IndexError(f"pair {pair} of a batch of {len(self)} plans")
        return self.pairs(torch.tensor([pair % len(self)], device=self.values.device))

    def __iter__(self) -> Iterator[TransportPlan]:
        return (self[pair] for pair in range(len(self)))

    def pairs(self, ids: torch.Tensor) -> TransportPlan:
        """The plans of the pairs ``ids`` (indices or a boolean mask)."""
        return TransportPlan(self.values[ids], None if self.windows is None else self.windows.pairs(ids))

    def dense(self) -> torch.Tensor:
        """The plans as a ``[B, N, M]`` array (zero outside the windows)."""
        return self.values if self.windows is None else self.windows.dense(self.values)

    def candidates(self, rows: torch.Tensor) -> torch.Tensor:
        """Target patches ``[R, C]`` where a blend of source rows ``rows [R, P]`` of a one-pair plan can be
        nonzero: every target patch for a dense plan, the ``P`` rows' windows (``C = P K``) otherwise."""
        if self.windows is None:
            m = self.values.shape[2]
            return torch.arange(m, device=rows.device).expand(rows.shape[0], m)
        return self.windows.index[0, rows.flatten()].view(rows.shape[0], -1)

    def values_at(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A one-pair plan's values at source patches ``rows [R]`` and target patches ``targets [R, J]``."""
        if self.windows is None:
            return self.values[0, rows[:, None], targets]
        return self.windows.values_at(self.values, rows, targets[None])[0]

    def where(self, mask: torch.Tensor, other: TransportPlan) -> TransportPlan:
        """Per pair, this plan where ``mask [B]`` is true and ``other``'s elsewhere (stored alike: both dense,
        or both windowed with windows of one size)."""
        if (self.windows is None) != (other.windows is None) or self.values.shape != other.values.shape:
            raise ValueError(f"cannot mix plans stored as {self.values.shape} and {other.values.shape}")
        batch = len(self)
        picks = torch.arange(batch, device=self.values.device) + batch * (~mask).long().to(self.values.device)
        return stack_plans([self, other]).pairs(picks)

    def mirror_rows(self, src_grid: tuple[int, int]) -> TransportPlan:
        """The plans with the source grid ``(Hs, Ws)`` mirrored left-right (source patch ``(r, c)`` becomes
        ``(r, Ws - 1 - c)``), e.g. a plan solved on a mirrored source image mapped back to the original grid."""

        def flip(rows: torch.Tensor) -> torch.Tensor:
            return rows.reshape(rows.shape[0], *src_grid, *rows.shape[2:]).flip(2).reshape(rows.shape)

        windows = self.windows
        if windows is None:
            return TransportPlan(flip(self.values))
        return TransportPlan(
            flip(self.values),
            Windows(
                flip(windows.top), flip(windows.left), windows.size, src_grid, windows.trg_grid, flip(windows.index)
            ),
        )


def stack_plans(plans: list[TransportPlan]) -> TransportPlan:
    """One batch of the plans of several batches, stored alike (all dense, or all windowed with one window size)."""
    values = torch.cat([plan.values for plan in plans])
    if all(plan.windows is None for plan in plans):
        return TransportPlan(values)
    windows = [plan.windows for plan in plans]
    if any(w is None or w.size != windows[0].size for w in windows):
        raise ValueError("cannot stack dense plans with windowed ones, or windows of different sizes")
    first = windows[0]
    return TransportPlan(
        values,
        Windows(
            torch.cat([w.top for w in windows]),
            torch.cat([w.left for w in windows]),
            first.size,
            first.src_grid,
            first.trg_grid,
            torch.cat([w.index for w in windows]),
        ),
    )
