"""The ElastuneJob resource's spec: an Elastune job spec plus the shape of its Ray cluster.

The job's own fields keep their names (a job spec file pastes in unchanged); the fields only
Kubernetes has are camelCase like the rest of Kubernetes: `cluster`, `suspend` and
`checkpoint.deleteOnFinish`. `name` may be left out: it defaults to the resource's name.
"""

from __future__ import annotations

from pydantic import Field

from elastune.spec.base import NAME_RULE, Strict
from elastune.spec.models import JobSpec
from elastune.spec.scaling import CheckpointSpec

QUANTITY_RULE = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
K8S_FIELDS = ("cluster", "suspend")  # not part of the job spec the Ray job runs


class PodResources(Strict):
    """Requests and limits of a Ray pod (equal: Ray sizes itself by them)."""

    cpu: str = Field("1", pattern=QUANTITY_RULE, description="CPU cores, a Kubernetes quantity ('1', '500m').")
    memory: str = Field("2Gi", pattern=QUANTITY_RULE, description="Memory, a Kubernetes quantity ('2Gi').")


class WorkerResources(PodResources):
    gpu: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per worker pod; scaling.gpus_per_worker > 0 needs it.")


class StorageSpec(Strict):
    """Where data, run directories and checkpoints live on the cluster."""

    claimName: str = Field(
        "elastune-shared",
        pattern=NAME_RULE,
        description="PersistentVolumeClaim mounted at /mnt/elastune on every Ray pod: relative data.path, output_dir and "
        "checkpoint.path resolve there (default checkpoints: /mnt/elastune/checkpoints/NAMESPACE/NAME).",
    )
    credentialsSecret: str | None = Field(
        None,
        pattern=NAME_RULE,
        description="Secret whose keys become the Ray pods' environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL_S3) for an s3:// checkpoint.path; never written into the spec.",
    )


class ClusterSpec(Strict):
    """The Ray cluster the operator makes for the job (a RayJob's cluster, gone when the job ends)."""

    image: str | None = Field(
        None,
        min_length=1,
        description=(
            "Image of the Ray pods; default: the operator's ELASTUNE_IMAGE. With "
            "ELASTUNE_ALLOWED_IMAGES set, only those prefixes."
        ),
    )
    head: PodResources = Field(default_factory=PodResources)
    workers: WorkerResources = Field(default_factory=WorkerResources)
    storage: StorageSpec = Field(default_factory=StorageSpec)


class ClusterCheckpointSpec(CheckpointSpec):
    deleteOnFinish: bool = Field(
        False,
        description=(
            "Delete the job's checkpoints when the ElastuneJob is deleted; by "
            "default they stay. Only a checkpoint.path inside the "
            "job's own prefix (the volume's checkpoints/<namespace>/<name>, or the "
            "operator's ELASTUNE_CHECKPOINT_PREFIX) is accepted."
        ),
    )


class ElastuneJobSpec(JobSpec):
    """spec of an ElastuneJob (elastune.io/v1alpha1). Only its schema is used: the operator
    validates the job part with the job spec's own rules (their messages) and `cluster` here."""

    name: str | None = Field(None, pattern=NAME_RULE, description="The job's name; default: the ElastuneJob's name.")  # type: ignore[assignment]
    checkpoint: ClusterCheckpointSpec = Field(default_factory=ClusterCheckpointSpec)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    suspend: bool = Field(
        False,
        description="true stops the job and its Ray cluster, keeping its checkpoints; false again resumes "
        "from the newest durable checkpoint.",
    )


class Condition(Strict):
    type: str
    status: str = Field(pattern=r"^(True|False|Unknown)$")
    reason: str
    message: str = ""
    lastTransitionTime: str


class CheckpointStatus(Strict):
    step: int
    time: str = Field(description="When it became durable (RFC 3339).")


class ElastuneJobStatus(Strict):
    """status of an ElastuneJob, written by the operator only."""

    phase: str = Field(description="Invalid, Pending, Starting, Running, Suspended, Succeeded, Failed or Stopped.")
    message: str = ""
    rayJob: str | None = None
    rayCluster: str | None = None
    dashboardURL: str | None = None
    step: int | None = Field(None, description="Optimizer steps done (from the job's metrics).")
    samples: int | None = Field(None, description="Samples trained.")
    worldSize: int | None = Field(None, description="Workers in the last step.")
    loss: float | None = Field(None, description="Training loss of the last step.")
    evalLoss: float | None = Field(None, description="Held-out loss at the last evaluation (jobs with an eval section).")
    lastDurableCheckpoint: CheckpointStatus | None = None
    failuresSurvived: int | None = Field(None, description="Worker failures the run recovered from.")
    resizes: int | None = None
    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
