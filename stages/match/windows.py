r"""Windowed (sparse) transport plans: per source patch a rectangle of target patches, and the GWOT
operations on them without any ``N x M`` array.

A windowed plan over a source grid ``Hs x Ws`` (N patches) and a target grid ``Ht x Wt`` (M patches) keeps,
for source patch ``i`` of pair ``b``, the entries ``T_ij`` of the ``wy x wx`` target patches whose top-left
corner is ``(top[b, i], left[b, i])`` (windows lie inside the target grid), as values ``[B, N, K]`` with
``K = wy * wx`` in row-major window order; every other entry is zero. Storage is O(N K) instead of O(N M).

The quadratic terms' gradients at the plan's entries (:mod:`stages.match.costs` has the dense ones)::

    grad Q_s = 2 (As T1)_i + 2 (At T^T1)_j - 4 (As T At)_ij
    (As T At)_ij = sum_{k in Ns(i)} (T At)_kj

``T At`` of a row is a box filter of its window, exact on the window grown by ``k_trg // 2`` (``T`` is zero
outside the window); the source-side sum reads, for each of the ``k_src^2`` neighbours ``k`` of ``i``,
that grown window at ``i``'s window (zero where they do not overlap). The symmetry gradient depends on
(source column, target column) only, from the plan summed per column pair (a scatter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stages.match.costs import Grid, column_crossings, neighbour_mass_sum
from stages.match.grids import cosine_similarity

COST_CHUNK = 1 << 20  # dense similarities per chunk of source patches when computing a windowed feature cost


def _box_sum_last2(images: torch.Tensor, k: int, grow: int, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sums over ``k x k`` boxes of the last two axes, zero outside, on the grid grown by ``grow`` on each
    side: ``[..., H, W] -> out [..., H + 2 grow, W + 2 grow]`` (shifted-slice sums: fast for small images;
    ``rows [..., H + 2 grow, W]`` is scratch space). Returns ``out``."""
    half = k // 2
    height, width = images.shape[-2:]
    rows.zero_()
    for shift in range(-half, half + 1):  # output row r sums input rows r - grow + shift
        low, high = max(0, grow - shift), min(height + 2 * grow, height + grow - shift)
        if low < high:
            rows[..., low:high, :] += images[..., low - grow + shift : high - grow + shift, :]
    out.zero_()
    for shift in range(-half, half + 1):
        low, high = max(0, grow - shift), min(width + 2 * grow, width + grow - shift)
        if low < high:
            out[..., low:high] += rows[..., low - grow + shift : high - grow + shift]
    return out


@dataclass(frozen=True)
class _NeighbourReads:
    """Scratch space and read positions of :meth:`Windows.neighbour_plan_sum`, fixed while the windows are.

    The readers are the source patches, or with shared block windows the 2 x 2 blocks (``R = N / 4``),
    which read the ``k_src + 1`` squared neighbours around the block once for all four children."""

    padded: torch.Tensor  # [B, N, py, px] grown windows framed by zero margins (which stay zero)
    box_rows: torch.Tensor  # [B, N, wy + 2 grow, wx] the box sum's row pass
    row_starts: list[torch.Tensor]  # per neighbour offset (row-major), [B * R * wy] flat starts in ``padded``
    total: torch.Tensor  # [B, N, K] the result
    parts: list[torch.Tensor]  # [B, R, K] scratch: one offset's reads (1, or 6 with blocks)
    blocks: bool


@dataclass(frozen=True)
class Windows:
    """Where each source patch's window of target patches lies: top-left corners ``top``/``left``
    ``[B, N]`` (int64), the window size ``(wy, wx)`` and the two grids; ``index [B, N, K]`` is each entry's
    flat target patch."""

    top: torch.Tensor
    left: torch.Tensor
    size: tuple[int, int]
    src_grid: Grid
    trg_grid: Grid
    index: torch.Tensor
    _scratch: dict = field(default_factory=dict, compare=False, repr=False)  # buffers reused between calls

    @classmethod
    def at(cls, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], src_grid: Grid, trg_grid: Grid):
        """Windows with these top-left corners (clamped into the target grid)."""
        (wy, wx), (ht, wt) = size, trg_grid
        if not (1 <= wy <= ht and 1 <= wx <= wt):
            raise ValueError(f"window {size} does not fit the target grid {trg_grid}")
        top, left = top.clamp(0, ht - wy), left.clamp(0, wt - wx)
        rows = torch.arange(wy, device=top.device)[:, None] * wt
        cols = torch.arange(wx, device=top.device)[None, :]
        local = (rows + cols).flatten()
        index = (top * wt + left)[:, :, None] + local
        return cls(top=top, left=left, size=size, src_grid=src_grid, trg_grid=trg_grid, index=index)

    @property
    def entries(self) -> int:
        """``K``, the entries per source patch."""
        return self.size[0] * self.size[1]

    @property
    def trg_patches(self) -> int:
        """``M``, the target grid's patch count."""
        return self.trg_grid[0] * self.trg_grid[1]

    def pairs(self, ids: torch.Tensor) -> Windows:
        """The windows of the pairs ``ids``."""
        return Windows(self.top[ids], self.left[ids], self.size, self.src_grid, self.trg_grid, self.index[ids])

    def without_scratch(self) -> Windows:
        """The same windows without the buffers the solver's operations keep between calls."""
        return Windows(self.top, self.left, self.size, self.src_grid, self.trg_grid, self.index)

    # The operations Sinkhorn needs (the same names as stages.match.sinkhorn.DenseLayout).
    def trg(self, values: torch.Tensor) -> torch.Tensor:
        """Target values ``[B, M]`` at the plan's entries, ``[B, N, K]``."""
        return torch.gather(values, 1, self.index.flatten(1)).view(self.index.shape)

    def column_sum(self, entries: torch.Tensor) -> torch.Tensor:
        """``sum_i x_ij`` per target patch, ``[B, M]``."""
        out = entries.new_zeros(entries.shape[0], self.trg_patches)
        return out.scatter_add_(1, self.index.flatten(1), entries.flatten(1))

    def column_logsumexp(self, entries: torch.Tensor) -> torch.Tensor:
        """``log sum_i exp(x_ij)`` per target patch, ``[B, M]`` (``-inf`` where no window reaches)."""
        flat, index = entries.flatten(1), self.index.flatten(1)
        peak = entries.new_full((entries.shape[0], self.trg_patches), -torch.inf)
        peak = peak.scatter_reduce_(1, index, flat, "amax")
        shift = torch.where(torch.isfinite(peak), peak, 0.0)
        total = self.column_sum(torch.exp(flat - torch.gather(shift, 1, index)).view_as(entries))
        return total.log_().add_(shift)

    def times_trg(self, kernel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``K v`` per pair, ``[B, N]`` (with shared block windows, ``v`` is gathered once per block)."""
        blocks = self._shared_blocks()
        if blocks is None:
            return torch.linalg.vecdot(kernel, self.trg(values))
        batch, n, k = kernel.shape
        hb, wb = self.src_grid[0] // 2, self.src_grid[1] // 2
        window_values = torch.gather(values, 1, blocks).view(batch, hb, 1, wb, 1, k)
        return torch.linalg.vecdot(kernel.view(batch, hb, 2, wb, 2, k), window_values).view(batch, n)

    def times_src(self, kernel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``K^T u`` per pair, ``[B, M]`` (with shared block windows, summed per block before the scatter)."""
        blocks = self._shared_blocks()
        if blocks is None:
            return self.column_sum(kernel * values[:, :, None])
        batch, _, k = kernel.shape
        hb, wb = self.src_grid[0] // 2, self.src_grid[1] // 2
        kernel, values = kernel.view(batch, hb, 2, wb, 2, k), values.view(batch, hb, 2, wb, 2, 1)
        rows = torch.mul(kernel[:, :, 0], values[:, :, 0]).addcmul_(kernel[:, :, 1], values[:, :, 1])
        block_sums = rows[:, :, :, 0].add_(rows[:, :, :, 1])  # [B, hb, wb, K]
        out = block_sums.new_zeros(batch, self.trg_patches)
        return out.scatter_add_(1, blocks, block_sums.flatten(1))

    def _shared_blocks(self) -> torch.Tensor | None:
        """When every 2 x 2 block of source patches shares one window (as coarse-to-fine places them, on a
        source grid of even sides), each block's window entries as flat target patches ``[B, Nb * K]``
        (blocks row-major), so that products gather and scatter once per block; None otherwise."""
        if "blocks" not in self._scratch:
            (hs, ws), batch = self.src_grid, self.top.shape[0]
            blocks = None
            if hs % 2 == 0 and ws % 2 == 0:
                corners = torch.stack([self.top, self.left]).view(2, batch, hs // 2, 2, ws // 2, 2)
                if bool((corners == corners[:, :, :, :1, :, :1]).all()):
                    blocks = self.index.view(batch, hs // 2, 2, ws // 2, 2, -1)[:, :, 0, :, 0].reshape(batch, -1)
            self._scratch["blocks"] = blocks
        return self._scratch["blocks"]

    def feature_cost(self, src_feats: torch.Tensor, trg_feats: torch.Tensor) -> torch.Tensor:
        """``1 - cos(f_i, f_j)`` at the plan's entries, ``[B, N, K]``, from features ``[B, H, W, C]``: dense
        similarities for a chunk of source patches at a time (about ``COST_CHUNK`` similarities per pair),
        so memory stays O(N K + COST_CHUNK) instead of O(N M)."""
        src, n = src_feats.flatten(1, 2)[:, None], self.index.shape[1]
        chunk = max(1, COST_CHUNK // self.trg_patches)
        parts = [
            torch.gather(
                cosine_similarity(src[:, :, start : start + chunk], trg_feats), 2, self.index[:, start : start + chunk]
            )
            for start in range(0, n, chunk)
        ]
        return torch.cat(parts, 1).neg_().add_(1)

    # Between layouts.
    def values_at(self, entries: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The plan's values (entries ``[B, N, K]``) at source patches ``rows [R]`` and target patches
        ``targets [B, R, J]``, zero outside the windows, ``[B, R, J]``."""
        (wy, wx), wt = self.size, self.trg_grid[1]
        down = torch.div(targets, wt, rounding_mode="floor") - self.top[:, rows, None]
        right = targets % wt - self.left[:, rows, None]
        inside = (down >= 0) & (down < wy) & (right >= 0) & (right < wx)
        cells = rows[None, :, None] * entries.shape[2] + torch.where(inside, down * wx + right, 0)
        values = torch.gather(entries.flatten(1), 1, cells.flatten(1)).view(cells.shape)
        return values.masked_fill_(~inside, 0.0)

    def dense(self, entries: torch.Tensor) -> torch.Tensor:
        """The full ``[B, N, M]`` array of windowed entries ``[B, N, K]`` (zero outside the windows)."""
        out = entries.new_zeros(*entries.shape[:2], self.trg_patches)
        return out.scatter_(2, self.index, entries)

    def restrict(self, full: torch.Tensor) -> torch.Tensor:
        """The entries ``[B, N, K]`` of a full ``[B, N, M]`` array inside the windows."""
        return torch.gather(full, 2, self.index)

    # The quadratic terms.
    def _neighbour_reads(self, k_src: int, k_trg: int, dtype: torch.dtype) -> _NeighbourReads:
        """Where ``neighbour_plan_sum`` reads, fixed while the windows are, and its buffers (made once:
        fresh buffers are slow, the kernel zero-fills their pages): padded grown windows ``[B, N, py, px]``
        and, per source neighbour offset, where each row of the reader's window starts in the neighbour's
        padded frame, flat over the whole buffer, ``[B * R * wy]`` (in a zero margin where the neighbour is
        off the grid or its window does not overlap the reader's)."""
        key = (k_src, k_trg, dtype)
        if key in self._scratch:
            return self._scratch[key]
        batch, n = self.top.shape
        (wy, wx), (hs, ws) = self.size, self.src_grid
        grow = k_trg // 2
        py, px = 3 * wy + 2 * grow, 3 * wx + 2 * grow
        device = self.top.device
        step = 2 if self._shared_blocks() is not None else 1  # readers: patches, or blocks' first children
        rows, cols = torch.meshgrid(
            torch.arange(0, hs, step, device=device), torch.arange(0, ws, step, device=device), indexing="ij"
        )
        rows, cols = rows.flatten(), cols.flatten()
        readers = rows * ws + cols
        top, left = self.top[:, readers], self.left[:, readers]
        frames = torch.arange(batch, device=device)[:, None] * (n * py * px)  # each pair's part of the buffer
        window_rows = torch.arange(wy, device=device) * px
        row_starts, half = [], k_src // 2
        offsets = range(-half, half + step)
        for dy in offsets:
            for dx in offsets:
                inside = (rows + dy >= 0) & (rows + dy < hs) & (cols + dx >= 0) & (cols + dx < ws)
                source = torch.where(inside, readers + dy * ws + dx, 0)
                # The reader's window in the neighbour's padded frame: top_i - top_k + grow + wy, clamped to
                # the zeros.
                shift_y = (top - self.top[:, source] + grow + wy).clamp(0, py - wy)
                shift_x = (left - self.left[:, source] + grow + wx).clamp(0, px - wx)
                start = torch.where(inside, source * (py * px) + shift_y * px + shift_x, 0)  # 0: a margin
                row_starts.append(((frames + start)[:, :, None] + window_rows).flatten())
        reads = _NeighbourReads(
            padded=torch.zeros(batch, n, py, px, dtype=dtype, device=device),
            box_rows=torch.empty(batch, n, wy + 2 * grow, wx, dtype=dtype, device=device),
            row_starts=row_starts,
            total=torch.empty(batch, n, wy * wx, dtype=dtype, device=device),
            parts=[torch.empty(batch, len(readers), wy * wx, dtype=dtype, device=device) for _ in range(5 * step - 4)],
            blocks=step == 2,
        )
        self._scratch[key] = reads
        return reads

    def neighbour_plan_sum(self, plan: torch.Tensor, k_src: int, k_trg: int) -> torch.Tensor:
        """``(As T At)_ij`` at the plan's entries, ``[B, N, K]`` (see the module docstring), in a buffer that
        the next call overwrites."""
        batch, n, _ = plan.shape
        (wy, wx), grow = self.size, k_trg // 2
        reads = self._neighbour_reads(k_src, k_trg, plan.dtype)
        # T At on the windows grown by grow, framed by zero margins of a window's size.
        inner = reads.padded[:, :, wy:-wy, wx:-wx]
        _box_sum_last2(plan.view(batch, n, wy, wx), k_trg, grow, inner, reads.box_rows)
        strips = reads.padded.view(-1).unfold(0, wx, 1)  # every run of wx buffer entries (a view): rows to copy

        def read(offset: int, out: torch.Tensor) -> torch.Tensor:
            return torch.index_select(strips, 0, reads.row_starts[offset], out=out.view(-1, wx)).view_as(out)

        if not reads.blocks:
            read(0, reads.total)
            for offset in range(1, len(reads.row_starts)):
                reads.total.add_(read(offset, reads.parts[0]))
            return reads.total
        return self._block_neighbour_sum(reads, read, k_src)

    def _block_neighbour_sum(self, reads: _NeighbourReads, read, k_src: int) -> torch.Tensor:
        """The neighbour sums of the four children of each 2 x 2 block from the block's ``(k_src + 1)^2``
        reads ``R[r][c]``: child ``(a, b)`` sums rows ``a .. a + k_src - 1`` and columns ``b .. b + k_src - 1``
        (a sum over the other child's columns or rows is the first's minus one end plus the other end)."""
        batch, k = reads.total.shape[0], reads.total.shape[2]
        hb, wb = self.src_grid[0] // 2, self.src_grid[1] // 2
        children = reads.total.view(batch, hb, 2, wb, 2, k)
        first, part, left, right, left_top, right_top = (p.view(batch, hb, wb, k) for p in reads.parts)
        span = k_src + 1
        for r in range(span):
            read(r * span, first)
            left.copy_(first)
            for c in range(1, k_src):
                left.add_(read(r * span + c, part))  # columns 0 .. k_src - 1
            torch.sub(left, first, out=right).add_(read(r * span + k_src, part))  # columns 1 .. k_src
            if r == 0:
                children[:, :, 0, :, 0], children[:, :, 0, :, 1] = left, right
                left_top.copy_(left)
                right_top.copy_(right)
            elif r < k_src:
                children[:, :, 0, :, 0] += left
                children[:, :, 0, :, 1] += right
            else:  # rows 1 .. k_src
                torch.sub(children[:, :, 0, :, 0], left_top, out=children[:, :, 1, :, 0]).add_(left)
                torch.sub(children[:, :, 0, :, 1], right_top, out=children[:, :, 1, :, 1]).add_(right)
        return reads.total

    def add_spatial_gradient(self, cost, plan, k_src: int, k_trg: int, weight: float) -> torch.Tensor:
        """``cost += weight * grad Q_s(T)`` in place at the plan's entries ``[B, N, K]``; returns ``cost``."""
        cost.add_(self.neighbour_plan_sum(plan, k_src, k_trg), alpha=-4 * weight)
        cost.add_(neighbour_mass_sum(plan.sum(2), self.src_grid, k_src)[:, :, None], alpha=2 * weight)
        trg_neighbours = neighbour_mass_sum(self.column_sum(plan), self.trg_grid, k_trg)
        return cost.add_(self.trg(trg_neighbours), alpha=2 * weight)

    def spatial_value(self, plan: torch.Tensor, k_src: int, k_trg: int) -> torch.Tensor:
        """``Q_s(T)`` per pair, ``[B]``."""
        src_mass, trg_mass = plan.sum(2), self.column_sum(plan)
        value = (src_mass * neighbour_mass_sum(src_mass, self.src_grid, k_src)).sum(1)
        value = value + (trg_mass * neighbour_mass_sum(trg_mass, self.trg_grid, k_trg)).sum(1)
        return value - 2 * (plan * self.neighbour_plan_sum(plan, k_src, k_trg)).sum((1, 2))

    def _column_pairs(self) -> torch.Tensor:
        """Each entry's (source column, target column) cell of a ``[Ws, Wt]`` table, flat, ``[B, N, K]``
        (computed once: it is fixed while the windows are)."""
        if "column_pairs" not in self._scratch:
            ws, wt = self.src_grid[1], self.trg_grid[1]
            src_columns = torch.arange(self.index.shape[1], device=self.index.device) % ws
            self._scratch["column_pairs"] = src_columns[None, :, None] * wt + self.index % wt
        return self._scratch["column_pairs"]

    def _crossings(self, plan: torch.Tensor) -> torch.Tensor:
        """``G`` per (source column, target column), ``[B, Ws, Wt]`` (see :mod:`stages.match.costs`)."""
        ws, wt = self.src_grid[1], self.trg_grid[1]
        columns = plan.new_zeros(plan.shape[0], ws * wt).scatter_add_(
            1, self._column_pairs().flatten(1), plan.flatten(1)
        )
        return column_crossings(columns.view(-1, ws, wt))

    def add_symmetry_gradient(self, cost: torch.Tensor, plan: torch.Tensor, weight: float) -> torch.Tensor:
        """``cost += weight * grad Q_y(T)`` in place at the plan's entries; returns ``cost``."""
        crossing = self._crossings(plan).flatten(1)
        cells = self._column_pairs()
        return cost.add_(torch.gather(crossing, 1, cells.flatten(1)).view_as(cost), alpha=2 * weight)

    def symmetry_value(self, plan: torch.Tensor) -> torch.Tensor:
        """``Q_y(T)`` per pair, ``[B]``."""
        crossing = self._crossings(plan).flatten(1)
        return (plan * torch.gather(crossing, 1, self._column_pairs().flatten(1)).view_as(plan)).sum((1, 2))
