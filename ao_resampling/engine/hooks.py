"""Reading the residual stream of one layer, and writing an activation into another.

Two mechanisms, each built apart from being attached (TransformerLens style):

- capture: a forward hook on decoder layer ``layer`` stores its output and stops the forward pass right there, so
  reading layer 31 of a 62-layer model costs half a forward, not a whole one;
- injection: ``inject`` is a pure tensor function (``h[p] += normalize(v) * ||h[p]|| * coefficient`` at each
  placeholder position); the hook around it only decides *when* it applies: on the oracle's prompt (prefill) pass,
  never on a decode step, where the placeholders are already in the KV cache.

``attached`` registers a hook and always removes it, also when the forward raises.

Shape letters:
    B  rows of the batch (one sequence each)
    L  the batch's padded sequence length
    K  the positions of a row that are read or written (an oracle prompt's placeholders)
    D  the model's hidden size
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ao_resampling.engine.loading.adapters import adapter_disabled
from ao_resampling.errors import NonFiniteError
from ao_resampling.engine.loading.models import decoder_layers, model_device

Hook = Callable[[nn.Module, tuple, object], object]


def inject(resid_BLD: torch.Tensor, vectors_BKD: torch.Tensor, positions_BK: torch.Tensor,
           coefficient: float) -> torch.Tensor:
    """Return a copy of ``resid_BLD`` with ``normalize(v) * ||h[p]|| * coefficient`` added at each position.

    Row b gets its own K vectors at its own K positions. The arithmetic is the published AO hook's (nl_probes
    ``get_hf_activation_steering_hook``), dtype for dtype: v normalised in its own dtype, ||h|| in the residual's, the
    steering vector cast to the residual's dtype and added there. In bf16 that is what the oracle was run with.
    """
    B, K = positions_BK.shape
    if (vectors_BKD.ndim != 3 or vectors_BKD.shape[:2] != (B, K) or resid_BLD.shape[0] != B
            or vectors_BKD.shape[2] != resid_BLD.shape[2]):
        raise ValueError(
            f"inject: residual batch {tuple(resid_BLD.shape)}, vectors {tuple(vectors_BKD.shape)} and positions "
            f"{tuple(positions_BK.shape)} disagree"
        )
    rows_BK = torch.arange(B, device=resid_BLD.device).unsqueeze(1).expand(B, K)
    positions_BK = positions_BK.to(resid_BLD.device)
    h_BKD = resid_BLD[rows_BK, positions_BK]
    direction_BKD = nn.functional.normalize(vectors_BKD.to(resid_BLD.device), dim=-1)
    steering_BKD = (direction_BKD * h_BKD.norm(dim=-1, keepdim=True) * coefficient).to(resid_BLD.dtype)
    injected_BKD = h_BKD + steering_BKD
    # e.g. a coefficient of 1e39 overflows the residual's dtype (a meta tensor, the device tests' stand-in, has no
    # values to check)
    if injected_BKD.device.type != "meta" and not torch.isfinite(injected_BKD).all():
        raise NonFiniteError(f"the injected state is not finite (NaN or inf) at coefficient {coefficient:g}: "
                             f"the activation scaled by it overflows {resid_BLD.dtype}; use a smaller "
                             "steering_coefficient")
    out_BLD = resid_BLD.clone()
    out_BLD[rows_BK, positions_BK] = injected_BKD
    return out_BLD


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # decoder layers return a tensor or a tuple


def _replace_hidden(output: object, hidden: torch.Tensor) -> object:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def make_injection_hook(vectors_BKD: torch.Tensor, positions_BK: torch.Tensor, coefficient: float) -> Hook:
    """A forward hook that injects on the prompt pass only.

    A decode step feeds one new token per row (sequence length 1); the prompt pass feeds the whole prompt, which
    always holds the placeholders, so "more than one position" is exactly "prefill".
    """

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        resid_BLD = _hidden(output)
        if resid_BLD.shape[1] <= 1:
            return output
        return _replace_hidden(output, inject(resid_BLD, vectors_BKD, positions_BK, coefficient))

    return hook


@contextlib.contextmanager
def attached(module: nn.Module, hook: Hook) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def injecting(model: nn.Module, layer: int, vectors_BKD: torch.Tensor, positions_BK: torch.Tensor,
              coefficient: float) -> Iterator[None]:
    with attached(decoder_layers(model)[layer], make_injection_hook(vectors_BKD, positions_BK, coefficient)):
        yield


class _StopForward(Exception):
    """Raised by the capture hook: everything above the read layer is wasted compute."""


def make_capture_hook(store: dict[str, torch.Tensor]) -> Hook:
    def hook(module: nn.Module, args: tuple, output: object) -> object:
        store["resid_BLD"] = _hidden(output).detach()
        raise _StopForward

    return hook


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu",
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids_BL, attention_mask_BL), to the longest or to ``length``."""
    L = max([len(s) for s in sequences] + [length or 0])
    ids_BL = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(sequences), L), dtype=torch.long)
    for b, seq in enumerate(sequences):
        if len(seq):
            ids_BL[b, L - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask_BL[b, L - len(seq):] = 1
    return ids_BL.to(device), mask_BL.to(device)


def position_ids_from_mask(mask_BL: torch.Tensor) -> torch.Tensor:
    """Left padding shifts every row; positions count real tokens only (pads get 0, as HF generate does)."""
    return (mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def capture_activations(model: nn.Module, sequences: Sequence[Sequence[int]], positions: Sequence[int], layer: int,
                        pad_id: int) -> torch.Tensor:
    """Residual output of decoder ``layer`` at one position per sequence, with any adapter disabled -> acts_BD."""
    return capture_activations_at(model, sequences, [[p] for p in positions], layer, pad_id)[:, 0]


@torch.inference_mode()
def capture_activations_at(model: nn.Module, sequences: Sequence[Sequence[int]], positions_BK: Sequence[Sequence[int]],
                           layer: int, pad_id: int) -> torch.Tensor:
    """Residual output of decoder ``layer`` at K positions per sequence (one pass), adapter disabled -> acts_BKD.

    ``positions_BK`` index the unpadded sequences; they are shifted by each row's left padding here.
    """
    device = model_device(model)
    ids_BL, mask_BL = left_pad(sequences, pad_id, device)
    store: dict[str, torch.Tensor] = {}
    with adapter_disabled(model), attached(decoder_layers(model)[layer], make_capture_hook(store)):
        try:
            model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=position_ids_from_mask(mask_BL),
                  use_cache=False)
        except _StopForward:
            pass
    if "resid_BLD" not in store:
        raise RuntimeError(f"layer {layer} was never reached during capture")
    resid_BLD = store["resid_BLD"]  # on the read layer's device: not the first one when device_map spreads the model
    pad_B = ids_BL.shape[1] - torch.tensor([len(s) for s in sequences], device=resid_BLD.device)
    padded_BK = torch.as_tensor([list(p) for p in positions_BK], device=resid_BLD.device) + pad_B[:, None]
    rows_BK = torch.arange(len(sequences), device=resid_BLD.device)[:, None].expand_as(padded_BK)
    acts_BKD = resid_BLD[rows_BK, padded_BK]
    bad_B = (~torch.isfinite(acts_BKD)).flatten(1).any(dim=1)
    if bad_B.any():  # one sync per capture batch; NaN read here would be injected into every answer of the target
        raise NonFiniteError(f"the activations read at layer {layer} are not finite (NaN or inf) in rows "
                             f"{bad_B.nonzero().flatten().tolist()} of a capture batch (dtype {resid_BLD.dtype})")
    return acts_BKD
