"""AdamW with its moments in host RAM (``--offload_optimizer true``).

LoRA on every gpt-oss expert trains about 92M float32 parameters on the 20b; AdamW's two moments are 0.69 GiB of
device memory, held for the whole run although they are only read once per optimizer step. :class:`HostAdamW` keeps
them in pinned host RAM and, at each step, streams them to the device in buckets, updates the parameters there with
PyTorch's fused AdamW kernel, and streams the moments back. Copies in both directions run on their own CUDA streams
and overlap the update of the previous bucket, so the device holds two buckets of moments, not all of them.

The arithmetic is PyTorch's own ``torch.optim.AdamW`` (decoupled weight decay, bias correction), so a run with the
moments offloaded follows the same trajectory as one without. On the CPU the moments are where the parameters are
and the same bucket loop runs without streams (this is what the tests exercise).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.adam import adam

BUCKET_BYTES = 32 * 2**20
"""Bytes of moments (both of them) streamed to the device per bucket; two buckets are in flight at a time."""

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class _Bucket:
    """Parameters updated together, with the offsets of their moments in the flat device buffers."""

    params: list[torch.Tensor]
    offsets: list[int]
    numel: int


@dataclass
class _CopyStreams:
    """A CUDA device's copy streams (moments to the device, back to the host) and, per buffer slot, the event
    recorded after the slot's moments were sent back."""

    load: torch.cuda.Stream
    store: torch.cuda.Stream
    freed: tuple[torch.cuda.Event, torch.cuda.Event]


class HostAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` whose ``exp_avg`` / ``exp_avg_sq`` live in pinned host RAM between steps.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled weight decay (AdamW).
        bucket_bytes: bytes of moments per streamed bucket (``BUCKET_BYTES``); larger buckets mean fewer kernel
            launches, smaller ones less device memory.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"HostAdamW: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.bucket_bytes = bucket_bytes
        self._buffers: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._streams: dict[torch.device, _CopyStreams] = {}
        self._slot = 0

    def _host_moment(self, param: torch.Tensor) -> torch.Tensor:
        """A zeroed moment for ``param`` in host RAM (pinned when the parameter is on a CUDA device)."""
        return torch.zeros(param.shape, dtype=param.dtype, device="cpu", pin_memory=param.is_cuda)

    def _state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameter's state, created on first use: step count on the device, moments in host RAM."""
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            for name in MOMENTS:
                state[name] = self._host_moment(param)
        return state

    def _buckets(self, params: list[torch.Tensor]) -> Iterator[_Bucket]:
        """Consecutive parameters of one device and dtype, at most ``bucket_bytes`` of moments each (a larger
        parameter gets a bucket of its own)."""
        current: list[torch.Tensor] = []
        offsets: list[int] = []
        numel = 0
        for param in params:
            size = 2 * param.numel() * param.element_size()
            fits = 2 * numel * param.element_size() + size <= self.bucket_bytes
            same = not current or (current[0].device == param.device and current[0].dtype == param.dtype)
            if current and not (fits and same):
                yield _Bucket(current, offsets, numel)
                current, offsets, numel = [], [], 0
            current.append(param)
            offsets.append(numel)
            numel += param.numel()
        if current:
            yield _Bucket(current, offsets, numel)

    def _device_buffers(self, device: torch.device, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        """Two flat buffers of ``2 x numel`` elements (both moments of a bucket) on the device, grown as needed."""
        key = (device, dtype)
        buffers = self._buffers.get(key)
        if buffers is not None and buffers[0].numel() < 2 * numel and device in self._streams:
            # The old buffers go back to the allocator on the compute stream: order their pending copies first.
            torch.cuda.current_stream(device).wait_stream(self._streams[device].load)
            torch.cuda.current_stream(device).wait_stream(self._streams[device].store)
        if buffers is None or buffers[0].numel() < 2 * numel:
            size = max(2 * numel, self.bucket_bytes // torch.empty((), dtype=dtype).element_size())
            buffers = [torch.empty(size, dtype=dtype, device=device) for _ in range(2)]
            self._buffers[key] = buffers
            if device in self._streams:
                # New blocks may be memory that kernels queued on the compute stream still read: the copy stream
                # writes into them only after those.
                self._streams[device].load.wait_stream(torch.cuda.current_stream(device))
        return buffers

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in ``torch.optim``).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._slot = 0
        devices = {param.device for group in self.param_groups for param in group["params"] if param.grad is not None}
        for device in devices:
            copies = self._copy_streams(device)
            if copies:
                # Everything queued on the compute stream comes first: the moments the last step sent back (the
                # compute stream waited for them), and the last kernels that read memory the allocator may hand
                # out again for this step's device buffers.
                copies.load.wait_stream(torch.cuda.current_stream(device))
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if any(param.grad.is_sparse for param in params):
                raise RuntimeError("HostAdamW does not support sparse gradients")
            for bucket in self._buckets(params):
                self._update(bucket, group)
        for device in devices:
            copies = self._copy_streams(device)
            if copies:
                torch.cuda.current_stream(device).wait_stream(copies.store)
        return loss

    def _update(self, bucket: _Bucket, group: dict[str, Any]) -> None:
        """Bring a bucket's moments to the device, update its parameters there, and send the moments back."""
        device, dtype = bucket.params[0].device, bucket.params[0].dtype
        states = [self._state(param) for param in bucket.params]
        slot = self._slot
        self._slot = 1 - slot
        flat = self._device_buffers(device, dtype, bucket.numel)[slot][: 2 * bucket.numel]
        views = {name: [flat[index * bucket.numel + offset: index * bucket.numel + offset + param.numel()]
                        .view_as(param) for param, offset in zip(bucket.params, bucket.offsets)]
                 for index, name in enumerate(MOMENTS)}
        copies = self._copy_streams(device)
        compute = torch.cuda.current_stream(device) if copies else None  # taken before entering the copy streams
        with torch.cuda.stream(copies.load) if copies else nullcontext():
            if copies:
                copies.load.wait_event(copies.freed[slot])  # the slot's last bucket has been sent back
            for name in MOMENTS:
                for view, state in zip(views[name], states):
                    view.copy_(state[name], non_blocking=True)
        if copies:
            compute.wait_stream(copies.load)
        beta1, beta2 = group["betas"]
        adam(
            bucket.params,
            [param.grad for param in bucket.params],
            views["exp_avg"],
            views["exp_avg_sq"],
            [],
            [state["step"] for state in states],
            fused=True,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        with torch.cuda.stream(copies.store) if copies else nullcontext():
            if copies:
                copies.store.wait_stream(compute)  # the update has written the moments
            for name in MOMENTS:
                for view, state in zip(views[name], states):
                    state[name].copy_(view, non_blocking=True)
            if copies:
                copies.freed[slot].record(copies.store)

    def _copy_streams(self, device: torch.device) -> _CopyStreams | None:
        """The copy streams and slot events of a CUDA device; None elsewhere."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = _CopyStreams(torch.cuda.Stream(device), torch.cuda.Stream(device),
                                                 (torch.cuda.Event(), torch.cuda.Event()))
        return self._streams[device]

    def state_dict(self) -> dict[str, Any]:
        """The state, after the last step's copies back to host RAM have completed."""
        for copies in self._streams.values():
            copies.store.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state (from this class or ``torch.optim.AdamW``): moments go to host RAM, the step count to the
        parameter's device.

        Args:
            state_dict: as returned by ``state_dict``.
        """
        for copies in self._streams.values():
            copies.store.synchronize()  # no copy of the last step still writes into the moments being replaced
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for name in MOMENTS:
                if name in state:
                    host = self._host_moment(param)
                    host.copy_(state[name])
                    state[name] = host
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)
