"""AWS connection options, boto3 clients with retries, and AWS errors turned into messages that name the fix.

Every AWS backend takes the same options (``AWS_ARGUMENT_SPEC``, documented once in the doc fragment
``sidekiq_ops.fleet.aws``), with the names that amazon.aws modules use. Credentials come from boto3's own chain
unless ``access_key``/``secret_key`` are given: the ``profile``, the ``AWS_*`` environment variables, the shared
config and credentials files, then the ECS task role or the EC2 instance role.

Throttled calls are retried by botocore itself, in its ``standard`` or ``adaptive`` retry mode, up to
``aws_max_attempts`` attempts in all. A call that still fails raises one of the ``AwsError`` subclasses with a
message naming the API action, the AWS resource, the region and the next step.

boto3 and botocore are imported only when a client is opened, so this file imports without them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

RETRY_MODES = ("standard", "adaptive")
# Attempts per API call, the first one included. botocore's own default is 3; a scheduled run every 30 to 60 s
# can afford a few more, because each retry of a throttled call waits a random time of up to 2^attempt seconds.
DEFAULT_MAX_ATTEMPTS = 5
MAX_ATTEMPTS_LIMIT = 20
USER_AGENT_EXTRA = "sidekiq-ops-fleet"

AWS_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "region": {"type": "str", "aliases": ["aws_region"]},
    "profile": {"type": "str", "aliases": ["aws_profile"]},
    "endpoint_url": {"type": "str", "aliases": ["aws_endpoint_url"]},
    "access_key": {"type": "str", "aliases": ["aws_access_key_id", "aws_access_key"], "no_log": True},
    "secret_key": {"type": "str", "aliases": ["aws_secret_access_key", "aws_secret_key"], "no_log": True},
    "session_token": {"type": "str", "aliases": ["aws_session_token"], "no_log": True},
    "validate_certs": {"type": "bool", "default": True},
    "aws_ca_bundle": {"type": "path"},
    "aws_retry_mode": {"type": "str", "choices": list(RETRY_MODES), "default": "standard"},
    "aws_max_attempts": {"type": "int", "default": DEFAULT_MAX_ATTEMPTS},
}

# Error codes that AWS services return for a throttled request. botocore retries these itself; the list decides
# which final error becomes an AwsThrottlingError.
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "BandwidthLimitExceeded",
    }
)
ACCESS_DENIED_CODES = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedException", "NotAuthorized"}
)
# Codes for credentials that AWS does not accept at all, as opposed to credentials that lack a permission.
CREDENTIALS_CODES = frozenset(
    {
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "AuthFailure",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "InvalidAccessKeyId",
    }
)
NOT_FOUND_CODES = frozenset(
    {
        "ClusterNotFoundException",
        "ServiceNotFoundException",
        "ServiceNotActiveException",
        "InvalidInstanceID.NotFound",
        "InvalidInstanceID.Malformed",
        "ResourceNotFoundException",
        "ResourceNotFound",
    }
)


class AwsError(Exception):
    """Base class: an AWS call failed or the AWS side cannot be scaled safely; the message names the fix."""


class AwsOptionsError(AwsError):
    """The AWS options are invalid, contradict each other, or name a profile or region that cannot be used."""


class AwsDependencyError(AwsError):
    """boto3 or botocore is not installed for the Python that runs the module."""


class AwsCredentialsError(AwsError):
    """No credentials were found, or AWS rejected them (invalid, expired, wrong signature)."""


class AwsAccessDeniedError(AwsError):
    """The credentials are valid but lack the permission for an API action."""


class AwsNotFoundError(AwsError):
    """The Auto Scaling group, ECS cluster, service, task definition or instance does not exist."""


class AwsThrottlingError(AwsError):
    """AWS kept throttling a call until every attempt was used."""


class AwsRequestError(AwsError):
    """Any other failed call: an endpoint that cannot be reached, a timeout, or an error AWS returned."""


class AwsConfigurationError(AwsError):
    """The AWS resources are set up in a way that this backend cannot scale without losing jobs."""


@dataclass(frozen=True)
class AwsSettings:
    """Validated AWS connection settings. ``None`` leaves a value to boto3's own chain."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    validate_certs: bool = True
    ca_bundle: str | None = None
    retry_mode: str = "standard"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def describe(self) -> str:
        """Describe where calls go, for messages: the region and any custom endpoint, never a credential."""
        where = f"region {self.region}" if self.region else "the default region"
        if self.endpoint_url:
            where += f" at endpoint {self.endpoint_url}"
        return where


def aws_settings(params: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> AwsSettings:
    """Validate the AWS options of a module (or any mapping with the same keys) and return the settings.

    The region falls back to the ``AWS_REGION`` environment variable here; boto3 then falls back to
    ``AWS_DEFAULT_REGION`` and the profile's region. Raises AwsOptionsError naming the option and the fix.
    """
    env = os.environ if environ is None else environ
    retry_mode = params.get("aws_retry_mode") or "standard"
    if retry_mode not in RETRY_MODES:
        raise AwsOptionsError(f"aws_retry_mode {retry_mode!r} is invalid; use one of {list(RETRY_MODES)}.")
    max_attempts = params.get("aws_max_attempts", DEFAULT_MAX_ATTEMPTS)
    if max_attempts is None:
        max_attempts = DEFAULT_MAX_ATTEMPTS
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
    ):
        raise AwsOptionsError(
            f"aws_max_attempts {max_attempts!r} is invalid; use an integer from 1 (no retry) to {MAX_ATTEMPTS_LIMIT}."
        )

    access_key = params.get("access_key") or None
    secret_key = params.get("secret_key") or None
    if bool(access_key) != bool(secret_key):
        missing = "secret_key" if access_key else "access_key"
        raise AwsOptionsError(f"access_key and secret_key go together; {missing} is missing.")
    if params.get("session_token") and not access_key:
        raise AwsOptionsError("session_token needs access_key and secret_key (temporary credentials come as three).")
    if params.get("profile") and access_key:
        raise AwsOptionsError("profile cannot be combined with access_key and secret_key; give one of them.")

    return AwsSettings(
        region=params.get("region") or env.get("AWS_REGION") or None,
        profile=params.get("profile") or None,
        endpoint_url=params.get("endpoint_url") or None,
        access_key=access_key,
        secret_key=secret_key,
        session_token=params.get("session_token") or None,
        validate_certs=bool(params.get("validate_certs", True)),
        ca_bundle=params.get("aws_ca_bundle") or None,
        retry_mode=retry_mode,
        max_attempts=max_attempts,
    )


def open_client(settings: AwsSettings, service: str) -> Any:
    """Open a boto3 client for `service` (``autoscaling``, ``ec2``, ``ecs``) with the retry settings.

    Raises AwsDependencyError without boto3, AwsOptionsError for an unknown profile or a missing region.
    Credentials are resolved lazily by boto3, so missing credentials surface at the first call.
    """
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound
    except ImportError as error:
        raise AwsDependencyError(
            "The Python packages boto3 and botocore are not installed for the Python interpreter that runs this "
            "module: install boto3 there, or point ansible_python_interpreter at a Python that has it."
        ) from error

    try:
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            aws_session_token=settings.session_token,
            region_name=settings.region,
            profile_name=settings.profile,
        )
    except ProfileNotFound as error:
        raise AwsOptionsError(
            f"The AWS profile {settings.profile!r} was not found ({error}); check profile and the files "
            "~/.aws/config and ~/.aws/credentials (or AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE)."
        ) from None
    if not session.region_name:
        raise AwsOptionsError(
            "No AWS region is set: give region, set AWS_REGION or AWS_DEFAULT_REGION, or set a region in the profile."
        )

    # botocore's "max_attempts" key counts retries only; "total_max_attempts" counts the first attempt too.
    config = Config(
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        user_agent_extra=USER_AGENT_EXTRA,
    )
    verify: bool | str = settings.ca_bundle or settings.validate_certs
    try:
        return session.client(service, endpoint_url=settings.endpoint_url, verify=verify, config=config)
    except (BotoCoreError, ValueError) as error:
        raise AwsOptionsError(f"Cannot open an AWS {service} client for {settings.describe()}: {error}") from None


class AwsApi:
    """One boto3 client and the context its error messages need: the backend's name and its IAM permissions."""

    def __init__(self, client: Any, settings: AwsSettings, backend: str, permissions: Sequence[str]) -> None:
        self.client = client
        self.settings = settings
        self.backend = backend
        self.permissions = tuple(permissions)

    @classmethod
    def open(cls, settings: AwsSettings, service: str, backend: str, permissions: Sequence[str]) -> AwsApi:
        return cls(open_client(settings, service), settings, backend, permissions)

    def action(self, operation: str) -> str:
        """Return the IAM action of a client method, for example ``autoscaling:SetDesiredCapacity``."""
        meta = self.client.meta
        name = meta.method_to_api_mapping.get(operation, operation)
        prefix = meta.service_model.signing_name
        return f"{prefix}:{name}"

    def call(self, operation: str, resource: str, **params: Any) -> dict[str, Any]:
        """Call a client method and return its response; raise an AwsError subclass that names the fix.

        `resource` names what the call acts on, for example ``Auto Scaling group 'sidekiq-default'``.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response: dict[str, Any] = getattr(self.client, operation)(**params)
        except ClientError as error:
            raise translate_client_error(error, self.action(operation), resource, self) from None
        except BotoCoreError as error:
            raise translate_botocore_error(error, self.action(operation), resource, self) from None
        return response


def _attempts(response: Mapping[str, Any]) -> int:
    metadata = response.get("ResponseMetadata") or {}
    return int(metadata.get("RetryAttempts") or 0) + 1


def translate_client_error(error: Any, action: str, resource: str, api: AwsApi) -> AwsError:
    """Turn a botocore ClientError into the AwsError subclass for its code, with a message naming the fix."""
    response = getattr(error, "response", {}) or {}
    details = response.get("Error") or {}
    code = str(details.get("Code") or "")
    message = str(details.get("Message") or error).strip().rstrip(".")
    where = api.settings.describe()

    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    # A 403 whose body names no known code (a proxy, or a reply botocore could not parse) is still a denial.
    if code in ACCESS_DENIED_CODES or (status == 403 and code not in CREDENTIALS_CODES):
        needed = ", ".join(api.permissions)
        return AwsAccessDeniedError(
            f"AWS denied {action} on {resource} in {where}: {message}. Allow {action} for the IAM role or user "
            f"that the module runs as; the {api.backend} backend needs {needed}."
        )
    if code in CREDENTIALS_CODES:
        return AwsCredentialsError(
            f"AWS rejected the credentials for {action} in {where} ({code}: {message}). Check access_key, "
            "secret_key and session_token, the profile, or the AWS_* environment variables; temporary "
            "credentials may have expired."
        )
    if code in THROTTLING_CODES:
        attempts = _attempts(response)
        return AwsThrottlingError(
            f"AWS throttled {action} on {resource} in {where} ({code}) on all {attempts} attempts "
            f"(retry mode {api.settings.retry_mode}). Run again later, raise aws_max_attempts, use "
            "aws_retry_mode: adaptive, or find the other clients that call this API in the account and region."
        )
    if code in NOT_FOUND_CODES or "not found" in message.lower():
        return AwsNotFoundError(f"{resource} was not found in {where} ({action}: {message}).")
    return AwsRequestError(f"{action} on {resource} failed in {where}: {code or 'error'}: {message}.")


def translate_botocore_error(error: Exception, action: str, resource: str, api: AwsApi) -> AwsError:
    """Turn a botocore error raised before AWS replied (credentials, connection, timeout) into an AwsError."""
    names = {cls.__name__ for cls in type(error).__mro__}
    where = api.settings.describe()
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return AwsCredentialsError(
            f"No usable AWS credentials were found for {action} ({error}). Give access_key and secret_key or a "
            "profile, set the AWS_* environment variables, or run where an EC2 instance role or ECS task role "
            "is available."
        )
    if "NoRegionError" in names:
        return AwsOptionsError(f"No AWS region is set for {action}: give region or set AWS_REGION.")
    if {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"} & names:
        return AwsRequestError(
            f"{action} on {resource} could not reach AWS in {where}: {error}. Check the network path, the region "
            "and endpoint_url; the call was retried up to aws_max_attempts times."
        )
    if "SSLError" in names:
        return AwsRequestError(
            f"TLS verification failed for {action} in {where}: {error}. Give aws_ca_bundle for a private "
            "certificate authority."
        )
    return AwsRequestError(f"{action} on {resource} failed in {where}: {error}.")


def epoch_seconds(value: Any) -> float | None:
    """Return a timestamp from a boto3 response (a datetime) as epoch seconds; None when absent."""
    return value.timestamp() if isinstance(value, datetime) else None


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """Split ids into lists of at most `size`, the maximum that one API call accepts."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]
