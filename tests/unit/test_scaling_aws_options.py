"""Tests of the AWS options, their documentation, the pool targets, the ECS stop budget check and error messages."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from ansible_collections.sidekiq_ops.fleet.plugins.doc_fragments.aws import ModuleDocFragment
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils import scaling_aws
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_client import (
    AWS_ARGUMENT_SPEC,
    AwsAccessDeniedError,
    AwsApi,
    AwsCredentialsError,
    AwsNotFoundError,
    AwsOptionsError,
    AwsRequestError,
    AwsSettings,
    AwsThrottlingError,
    aws_settings,
    open_client,
    translate_botocore_error,
    translate_client_error,
)
from ansible_collections.sidekiq_ops.fleet.plugins.module_utils.scaling_aws_ecs import (
    StopBudgetError,
    check_stop_timeout,
    is_fargate,
    sidekiq_container,
)

POOL = {"name": "default", "queues": ["default"], "timeout": 25, "processes": {"min": 1, "max": 4}}


def fragment(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load(getattr(ModuleDocFragment, name))["options"])


# Documentation


@pytest.mark.parametrize(
    ("fragment_name", "spec"),
    [("DOCUMENTATION", AWS_ARGUMENT_SPEC), ("TARGETS", scaling_aws.AWS_TARGETS_ARGUMENT_SPEC)],
)
def test_fragment_matches_spec(fragment_name: str, spec: dict[str, dict[str, Any]]) -> None:
    documented = fragment(fragment_name)

    assert sorted(documented) == sorted(spec)
    for name, option in spec.items():
        docs = documented[name]
        assert docs["type"] == option["type"], name
        assert docs.get("default") == option.get("default"), name
        assert docs.get("choices") == option.get("choices"), name
        assert docs.get("aliases") == option.get("aliases"), name
        assert docs["description"], name


def test_credentials_are_no_log() -> None:
    for name in ("access_key", "secret_key", "session_token"):
        assert AWS_ARGUMENT_SPEC[name]["no_log"] is True, name


def test_option_names_follow_amazon_aws() -> None:
    for name in ("region", "profile", "endpoint_url", "access_key", "secret_key", "session_token"):
        assert name in AWS_ARGUMENT_SPEC


# Settings


def test_settings_defaults_leave_chain_to_boto3() -> None:
    settings = aws_settings({}, environ={})

    assert settings == AwsSettings()
    assert settings.retry_mode == "standard"
    assert settings.max_attempts == 5


def test_settings_region_from_aws_region_env() -> None:
    assert aws_settings({}, environ={"AWS_REGION": "eu-west-1"}).region == "eu-west-1"
    assert aws_settings({"region": "us-east-2"}, environ={"AWS_REGION": "eu-west-1"}).region == "us-east-2"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"aws_retry_mode": "legacy"}, "aws_retry_mode 'legacy' is invalid"),
        ({"aws_max_attempts": 0}, "aws_max_attempts 0 is invalid"),
        ({"aws_max_attempts": 21}, "aws_max_attempts 21 is invalid"),
        ({"aws_max_attempts": True}, "aws_max_attempts True is invalid"),
        ({"access_key": "AKIA"}, "secret_key is missing"),
        ({"secret_key": "s"}, "access_key is missing"),
        ({"session_token": "t"}, "session_token needs access_key"),
        ({"profile": "ops", "access_key": "AKIA", "secret_key": "s"}, "profile cannot be combined"),
    ],
)
def test_settings_reject_invalid(params: dict[str, Any], message: str) -> None:
    with pytest.raises(AwsOptionsError, match=message):
        aws_settings(params, environ={})


def test_settings_repr_hides_secrets() -> None:
    settings = aws_settings({"access_key": "AKIAEXAMPLE", "secret_key": "topsecret", "session_token": "tok"})

    assert "topsecret" not in repr(settings)
    assert "tok" not in repr(settings)
    assert "topsecret" not in settings.describe()


def test_open_client_unknown_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))

    with pytest.raises(AwsOptionsError, match="profile 'missing' was not found"):
        open_client(AwsSettings(profile="missing", region="eu-west-1"), "autoscaling")


def test_open_client_without_region(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)

    with pytest.raises(AwsOptionsError, match="No AWS region is set"):
        open_client(AwsSettings(), "ecs")


def test_open_client_sets_retry_config() -> None:
    client = open_client(AwsSettings(region="eu-west-1", retry_mode="adaptive", max_attempts=7), "autoscaling")

    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert client.meta.region_name == "eu-west-1"


# Error messages


def api(settings: AwsSettings | None = None) -> AwsApi:
    client = open_client(settings or AwsSettings(region="eu-west-1"), "autoscaling")
    return AwsApi(client, settings or AwsSettings(region="eu-west-1"), "aws_asg", scaling_aws.ASG_PERMISSIONS)


def client_error(code: str, message: str, retries: int = 0) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"RetryAttempts": retries}}
    return ClientError(response, "SetDesiredCapacity")


def test_access_denied_names_action_and_permissions() -> None:
    error = translate_client_error(
        client_error("AccessDenied", "User: arn:aws:iam::1:user/ro is not authorized"),
        "autoscaling:SetDesiredCapacity",
        "Auto Scaling group 'sidekiq-default'",
        api(),
    )

    assert isinstance(error, AwsAccessDeniedError)
    text = str(error)
    assert "AWS denied autoscaling:SetDesiredCapacity on Auto Scaling group 'sidekiq-default'" in text
    assert "region eu-west-1" in text
    assert "is not authorized" in text
    assert "autoscaling:TerminateInstanceInAutoScalingGroup" in text


def test_throttling_counts_attempts() -> None:
    error = translate_client_error(client_error("Throttling", "Rate exceeded", retries=4), "a:B", "group", api())

    assert isinstance(error, AwsThrottlingError)
    assert "on all 5 attempts (retry mode standard)" in str(error)
    assert "aws_max_attempts" in str(error)


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        ("ClusterNotFoundException", "Cluster not found.", AwsNotFoundError),
        ("ValidationError", "Instance Id not found - No managed instance found", AwsNotFoundError),
        ("ExpiredToken", "The security token included in the request is expired", AwsCredentialsError),
        ("InvalidClientTokenId", "The security token included in the request is invalid.", AwsCredentialsError),
        ("ValidationError", "New SetDesiredCapacity value 9 is above max value 4", AwsRequestError),
    ],
)
def test_client_error_classes(code: str, message: str, expected: type[Exception]) -> None:
    error = translate_client_error(client_error(code, message), "a:B", "the resource", api())

    assert type(error) is expected
    assert message.rstrip(".") in str(error)


def test_botocore_errors() -> None:
    missing = translate_botocore_error(NoCredentialsError(), "ecs:DescribeServices", "service", api())
    unreachable = translate_botocore_error(
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "ecs:DescribeServices", "service", api()
    )

    assert isinstance(missing, AwsCredentialsError)
    assert "instance role or ECS task role" in str(missing)
    assert isinstance(unreachable, AwsRequestError)
    assert "could not reach AWS" in str(unreachable)


def test_action_names_iam_action() -> None:
    assert api().action("set_desired_capacity") == "autoscaling:SetDesiredCapacity"


# Targets


def test_targets_default_names() -> None:
    targets = scaling_aws.parse_targets("aws_asg", {}, ["default", "critical"])

    assert targets["default"].group_name == "sidekiq-default"
    assert targets["critical"].processes_per_instance == 1


def test_targets_ecs_needs_cluster() -> None:
    with pytest.raises(AwsOptionsError, match=r"aws_targets.default.cluster is missing"):
        scaling_aws.parse_targets("aws_ecs", {"default": {"service": "workers"}}, ["default"])


def test_targets_list_every_problem() -> None:
    targets = {"nope": {}, "default": {"group": "x", "processes_per_instance": 0}}

    with pytest.raises(AwsOptionsError) as raised:
        scaling_aws.parse_targets("aws_asg", targets, ["default"])

    text = str(raised.value)
    assert "unknown pools ['nope']" in text
    assert "unknown keys ['group']" in text
    assert "processes_per_instance 0 is invalid" in text


def test_targets_ecs_values() -> None:
    entry = {"cluster": "shop", "container": "worker", "processes_per_task": 2}

    target = scaling_aws.parse_targets("aws_ecs", {"default": entry}, ["default"])["default"]

    assert (target.cluster, target.service, target.container, target.processes_per_task) == (
        "shop",
        "sidekiq-default",
        "worker",
        2,
    )


def test_targets_reject_other_backend() -> None:
    with pytest.raises(AwsOptionsError, match="'systemd' is not an AWS backend"):
        scaling_aws.parse_targets("systemd", {}, ["default"])


# ECS stop budget


def task_definition(*containers: dict[str, Any], fargate: bool = True) -> dict[str, Any]:
    return {
        "taskDefinitionArn": "arn:aws:ecs:eu-west-1:1:task-definition/sidekiq-default:3",
        "containerDefinitions": list(containers),
        "requiresCompatibilities": ["FARGATE"] if fargate else ["EC2"],
    }


def test_stop_budget_fits() -> None:
    sentence = check_stop_timeout(POOL, 10, task_definition({"name": "sidekiq", "stopTimeout": 35}), None, True)

    assert "waits 35 s" in sentence
    assert "stop budget of 35 s" in sentence


def test_stop_budget_above_fargate_cap() -> None:
    pool = {**POOL, "timeout": 115}

    with pytest.raises(StopBudgetError) as raised:
        check_stop_timeout(pool, 10, task_definition({"name": "sidekiq", "stopTimeout": 120}), None, True)

    text = str(raised.value)
    assert "stop budget of 125 s (timeout 115 s + shutdown margin 10 s)" in text
    assert "Fargate's maximum stopTimeout of 120 s" in text
    assert "at most 110 s" in text


def test_stop_budget_above_stop_timeout() -> None:
    with pytest.raises(StopBudgetError) as raised:
        check_stop_timeout(POOL, 10, task_definition({"name": "sidekiq", "stopTimeout": 20}), None, True)

    text = str(raised.value)
    assert "stopTimeout 20 s, below the stop budget of 35 s" in text
    assert "Set stopTimeout to at least 35" in text
    assert "Fargate allows up to 120" in text


def test_stop_budget_unset_uses_default() -> None:
    with pytest.raises(StopBudgetError, match=r"stopTimeout 30 s \(not set, so ECS uses its default\)"):
        check_stop_timeout(POOL, 10, task_definition({"name": "sidekiq"}), None, False)

    small = {**POOL, "timeout": 20}
    assert "waits 30 s (not set" in check_stop_timeout(small, 10, task_definition({"name": "sidekiq"}), None, False)


def test_stop_budget_on_ec2_may_exceed_120() -> None:
    pool = {**POOL, "timeout": 300}
    definition = task_definition({"name": "sidekiq", "stopTimeout": 600}, fargate=False)

    assert "waits 600 s" in check_stop_timeout(pool, 10, definition, None, False)


def test_container_choice() -> None:
    two = task_definition({"name": "web"}, {"name": "sidekiq", "stopTimeout": 40})
    other = task_definition({"name": "web"}, {"name": "worker"})

    assert sidekiq_container(two, None)["name"] == "sidekiq"
    assert sidekiq_container(other, "worker")["name"] == "worker"
    with pytest.raises(scaling_aws.AwsConfigurationError, match=r"containers \['web', 'worker'\]; set container"):
        sidekiq_container(other, None)
    with pytest.raises(scaling_aws.AwsConfigurationError, match="no container named 'jobs'"):
        sidekiq_container(other, "jobs")


def test_fargate_detection() -> None:
    definition = task_definition({"name": "sidekiq"})

    assert is_fargate({"launchType": "FARGATE"}, definition)
    assert not is_fargate({"launchType": "EC2"}, definition)
    assert is_fargate({"capacityProviderStrategy": [{"capacityProvider": "FARGATE_SPOT"}]}, definition)
    assert not is_fargate({"capacityProviderStrategy": [{"capacityProvider": "my-asg"}]}, definition)
    assert is_fargate({}, definition)
