"""Settings of the counterfactual service: its models and the limits every attack budget is checked against.

It serves two registered models, each following its own alias in ``FACEXPLAIN_REGISTRY_URI``: the FR
model (``FACEXPLAIN_FR_MODEL_NAME`` / ``FACEXPLAIN_FR_MODEL_ALIAS``; local face-api weights without a
registry), which is both the default white-box surrogate and the default target, and the decoder for
exactly that FR version (``FACEXPLAIN_DECODER_MODEL_NAME`` / ``FACEXPLAIN_DECODER_MODEL_ALIAS``;
registry only): Explain and DefenceReport need it, Attack does not; and optionally an accessory probe
set (``FACEXPLAIN_PROBES_MODEL_NAME`` / ``_ALIAS``) whose attributes Explain then reports too. dlib's own descriptor
(``dlib`` as a ModelRef name) is available as a black-box target when ``dlib`` is installed, and so is an
independent registered FR model (``FACEXPLAIN_TARGET_MODEL_NAME`` / ``_ALIAS``, e.g. the second FR model
``facexplain-fr-hsefaceres1024``; registry only, following its alias; empty = none), scored through its own
pipeline, alignment and rule.

Limits (RESOURCE_EXHAUSTED when a request goes over them; a malformed value is INVALID_ARGUMENT):
steps per run, CW binary-search rounds, total gradient steps per request, epsilon per norm, wall-clock
seconds per attack, pairs per DefenceReport, random controls per Explain.
"""

from __future__ import annotations

from pydantic import Field

from facexplain.artifacts.embedder import SECOND_FR_MODEL
from facexplain.attacks import BudgetLimits
from registry import CHAMPION
from services.kit.config import DecoderModelSettings, FRModelSettings, ProbesModelSettings, ServiceSettings


class CounterfactualSettings(ServiceSettings, FRModelSettings, DecoderModelSettings, ProbesModelSettings):
    """``FACEXPLAIN_*`` settings of ``facexplain serve counterfactual``."""

    # embedding 50051, decoding 50052, directions 50053, attributes 50054, counterfactual 50055
    port: int = Field(50055, ge=0, le=65535, description="gRPC port; 0 picks a free one")

    max_attack_steps: int = Field(default=1000, ge=1, description="most iterations one attack run may ask for")
    max_total_steps: int = Field(
        default=5000, ge=1, description="most gradient steps one attack may cost (steps x CW search rounds)"
    )
    max_epsilon_linf: float = Field(default=32 / 255, gt=0, le=1, description="largest L-inf budget, pixel units")
    max_epsilon_l2: float = Field(default=20.0, gt=0, description="largest L2 budget, pixel units")
    max_attack_seconds: float = Field(
        default=120.0, gt=0, description="wall-clock limit of one attack (DEADLINE_EXCEEDED past it)"
    )
    cw_search_rounds: int = Field(default=4, ge=1, le=20, description="binary-search rounds over c of one CW attack")
    max_defence_pairs: int = Field(default=64, ge=1, description="most pairs one DefenceReport may hold")
    max_random_controls: int = Field(
        default=32, ge=0, description="most random controls (n_random) one Explain may ask"
    )
    max_attack_pixels: int = Field(
        default=1024 * 1024,
        ge=1,
        description="largest probe (width*height) an attack may perturb: gradients are taken w.r.t. every pixel",
    )
    batch_size: int = Field(default=16, ge=1, description="faces decoded / estimated per forward pass")
    target_model_name: str = Field(
        default="",
        description=f"registered FR model (kind embedder) offered as a black-box target, e.g. {SECOND_FR_MODEL}; "
        "registry only; empty = none",
    )
    target_model_alias: str = Field(default=CHAMPION, description="alias of the black-box target model to follow")

    def budget_limits(self) -> BudgetLimits:
        return BudgetLimits(
            max_steps=self.max_attack_steps,
            max_restarts=max(self.cw_search_rounds - 1, 0),
            max_total_steps=self.max_total_steps,
            max_epsilon_linf=self.max_epsilon_linf,
            max_epsilon_l2=self.max_epsilon_l2,
            max_seconds=self.max_attack_seconds,
        )
