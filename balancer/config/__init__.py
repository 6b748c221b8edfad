"""`regions.yaml` -> a typed, validated `Config`.

Checked twice, like envoyproxy/ratelimit: first every key against an allow-list
(a typo must not pass silently), then the values. Every error names the file, the
path of the field (`regions[3].deployments.gpt-4.tpm`) and the reason, and the
whole file is checked before anything is reported.

Both passes are driven by the dataclasses in `model`: the allow-list is a class's
fields, and each value is converted by its field's type and checked by the rules in
its metadata (`schema` lists them). A new setting is therefore one field, e.g. in
`GatewayConfig`:

    retry_jitter_seconds: float = setting(0.5, "random pause between attempts",
                                          minimum=0, maximum=5)

after which `gateway.retry_jitter_seconds` is accepted, defaulted, refused with its
path when out of range or not a number, and suggested for a typo; there is no
validator to touch. Checks across fields are small functions named in `check=`
(see `model`); `load` reads the file, its YAML and the REDIS_URL override.
"""

from balancer.config.load import DEFAULT_PATH, ConfigError, config_path, load, parse
from balancer.config.model import (
    KINDS,
    SETTLE_MODES,
    SKUS,
    STORE_SCHEMES,
    AdmissionQueue,
    Client,
    ClientBudget,
    Config,
    Deployment,
    FairShare,
    GatewayConfig,
    LatencyWeighting,
    LearnedCapacity,
    Listen,
    Region,
    Responses,
    Secret,
    StoreConfig,
    Target,
)
from balancer.config.schema import ENV_REF, NAME, setting

__all__ = [
    "DEFAULT_PATH", "ENV_REF", "KINDS", "NAME", "SETTLE_MODES", "SKUS", "STORE_SCHEMES",
    "AdmissionQueue", "Client", "ClientBudget", "Config", "ConfigError", "Deployment",
    "FairShare", "GatewayConfig",
    "LatencyWeighting", "LearnedCapacity", "Listen", "Region", "Responses", "Secret", "StoreConfig",
    "Target", "config_path", "load", "parse", "setting",
]
