"""Muon for hidden weight matrices, AdamW for everything else, behind one Optimizer.

Invariant: ``self.param_groups`` is the concatenation of the inner optimizers' group
lists, holding the *same* dict objects, and both inner optimizers share ``self.state``
(their parameter sets are disjoint). So LR schedulers that write ``group["lr"]`` reach
both halves, and the inherited ``state_dict``/``load_state_dict``/``zero_grad`` see every
parameter in the standard format (integer ids over the concatenated groups, Muon first),
which is also what ``torch.distributed.checkpoint.state_dict`` expects.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import AdamW, Optimizer
from torch.optim.optimizer import ParamsT


def _muon_class() -> type[Optimizer]:
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise ValueError(
            f"optimizer 'muon' needs torch.optim.Muon (torch >= 2.9); this torch is "
            f"{torch.__version__}, so choose another name or upgrade torch."
        )
    return muon


class MuonWithAdamW(Optimizer):
    """``torch.optim.Muon`` on ``muon_params`` and ``torch.optim.AdamW`` on ``adamw_params``.

    Either side may be empty (its inner optimizer is then ``None``), not both.
    ``muon_kwargs`` and ``adamw_kwargs`` go to the inner constructors unchanged.
    The inner optimizers are reachable as ``.muon`` and ``.adamw``.
    """

    def __init__(
        self,
        muon_params: ParamsT,
        adamw_params: ParamsT,
        *,
        muon_kwargs: Mapping[str, Any] | None = None,
        adamw_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        muon_list = list(muon_params)
        adamw_list = list(adamw_params)
        self.muon: Optimizer | None = (
            _muon_class()(muon_list, **dict(muon_kwargs or {})) if muon_list else None
        )
        self.adamw: Optimizer | None = (
            AdamW(adamw_list, **dict(adamw_kwargs or {})) if adamw_list else None
        )
        self._n_muon_groups = len(self.muon.param_groups) if self.muon is not None else 0
        groups = [g for opt in self._inner() for g in opt.param_groups]
        if not groups:
            raise ValueError("MuonWithAdamW needs parameters in muon_params or adamw_params.")
        self._linked = False
        super().__init__(groups, defaults={})
        self._link()

    def _inner(self) -> list[Optimizer]:
        return [opt for opt in (self.muon, self.adamw) if opt is not None]

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's group dicts and state."""
        n = self._n_muon_groups
        if self.muon is not None:
            self.muon.param_groups = self.param_groups[:n]
            self.muon.state = self.state
        if self.adamw is not None:
            self.adamw.param_groups = self.param_groups[n:]
            self.adamw.state = self.state
        self._linked = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_linked", False):
            raise NotImplementedError(
                "MuonWithAdamW cannot route a new parameter group; build a new optimizer."
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluate ``closure`` once (if given), then step Muon and AdamW."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner():
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The base class replaces self.param_groups and self.state with new objects.
        super().load_state_dict(state_dict)
        self._link()

    def __getstate__(self) -> dict[str, Any]:
        # Pickle/deepcopy keep the inner optimizers; the memo keeps shared objects shared.
        return {
            **super().__getstate__(),
            "muon": self.muon,
            "adamw": self.adamw,
            "_n_muon_groups": self._n_muon_groups,
            "_linked": True,
        }
