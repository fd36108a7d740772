"""A toy attack defined outside the engine, loaded by a job's ``plugins:`` list: the mean
pixel brightness of each image as a score, and its per-channel means as a feature vector.

It knows nothing about membership; it exists to show that an attack declared in one module
flows through the whole engine without any engine file naming it.
"""

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from clipaudit.attacks.base import MapBatch, StatelessAttack
from clipaudit.contract.registry import LOGISTIC, Attack, Column, Score, register


class BrightnessParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gamma: float = Field(1.0, gt=0, description="brightness is mean(pixel ** gamma)")
    label: str = Field("", description="reduce-only: changes nothing the map step writes")


class Brightness(StatelessAttack):
    name = "brightness"

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def compute(self, batch: MapBatch) -> dict[str, list]:
        px = batch.images.float() ** self.gamma  # B×3×S×S in [0, 1]
        return {"brightness_score": px.mean(dim=(1, 2, 3)).tolist(),
                "brightness_features": px.mean(dim=(2, 3)).tolist()}


register(Attack(
    name="brightness",
    title="mean brightness (toy)",
    params=BrightnessParams,
    build=lambda p, job: Brightness(p.gamma),
    reduce_only=frozenset({"label"}),
    columns=(Column("brightness_score", pa.float32(), "mean pixel value"),
             Column("brightness_features", pa.list_(pa.float32()), "mean of R, G, B")),
    scores=(Score("brightness", "image", "mean brightness over the identity's images"),),
    features="brightness_features",
    learned=(LOGISTIC,),
))
