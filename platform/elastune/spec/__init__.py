"""Job specs: pydantic models, YAML loading with explained errors, JSON Schema export."""

from elastune.spec.base import URI_SCHEMES, check_uri
from elastune.spec.load import load_spec, spec_dir_of, validate_spec
from elastune.spec.models import JobSpec, json_schema

__all__ = ["URI_SCHEMES", "JobSpec", "check_uri", "json_schema", "load_spec", "spec_dir_of", "validate_spec"]
