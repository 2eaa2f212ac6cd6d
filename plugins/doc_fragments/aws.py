"""Documentation of the AWS options shared by the modules that scale pools on AWS."""

from __future__ import annotations


class ModuleDocFragment:
    # Keep in step with AWS_ARGUMENT_SPEC in plugins/module_utils/scaling_aws_client.py.
    DOCUMENTATION = r"""
options:
  region:
    description:
      - AWS region of the Auto Scaling groups or ECS services, for example V(eu-west-1).
      - Falls back to the E(AWS_REGION) environment variable, then to boto3's own sources (E(AWS_DEFAULT_REGION),
        the region of the profile).
    type: str
    aliases: [aws_region]
  profile:
    description:
      - Named profile from C(~/.aws/config) and C(~/.aws/credentials) to take credentials and region from.
      - Cannot be combined with O(access_key) and O(secret_key).
      - Without a profile or keys, boto3's chain applies - E(AWS_PROFILE), the E(AWS_ACCESS_KEY_ID) family of
        environment variables, the shared files, then the ECS task role or the EC2 instance role.
    type: str
    aliases: [aws_profile]
  endpoint_url:
    description:
      - URL to send AWS API calls to instead of the region's public endpoints, for example a VPC endpoint or a
        test server. boto3 also reads E(AWS_ENDPOINT_URL) when this is not set.
    type: str
    aliases: [aws_endpoint_url]
  access_key:
    description:
      - AWS access key ID. Requires O(secret_key).
    type: str
    aliases: [aws_access_key_id, aws_access_key]
  secret_key:
    description:
      - AWS secret access key. Requires O(access_key). Never shown in results or logs.
    type: str
    aliases: [aws_secret_access_key, aws_secret_key]
  session_token:
    description:
      - Session token of temporary credentials, together with O(access_key) and O(secret_key).
    type: str
    aliases: [aws_session_token]
  validate_certs:
    description:
      - Verify the TLS certificate of the AWS endpoint. Turn off only for a test endpoint.
    type: bool
    default: true
  aws_ca_bundle:
    description:
      - PEM file of the certificate authorities that sign the certificate of O(endpoint_url).
    type: path
  aws_retry_mode:
    description:
      - botocore's retry mode for throttled and failed calls. Both wait a random time that grows
        exponentially between attempts. V(adaptive) also slows down the client's own request rate after
        throttling.
    type: str
    choices: [standard, adaptive]
    default: standard
  aws_max_attempts:
    description:
      - Attempts per API call, the first one included, from V(1) (no retry) to V(20).
      - A call still throttled after the last attempt fails the task with a message naming the API action.
    type: int
    default: 5
requirements:
  - boto3 and botocore for the Python that runs the module
notes:
  - Credentials are never shown in results or messages.
"""

    # Keep in step with AWS_TARGETS_ARGUMENT_SPEC and parse_targets in plugins/module_utils/scaling_aws.py.
    TARGETS = r"""
options:
  aws_targets:
    description:
      - Where each pool runs on AWS, keyed by pool name. A pool without an entry uses the defaults.
      - For V(aws_asg), an entry may give C(group_name), the Auto Scaling group (default C(sidekiq-<pool>)), and
        C(processes_per_instance), the Sidekiq processes each instance runs (default V(1)).
      - For V(aws_ecs), an entry gives C(cluster), the ECS cluster name or ARN (required), and may give
        C(service) (default C(sidekiq-<pool>)), C(container), the container that runs Sidekiq (default the only
        container, or the one named C(sidekiq)), and C(processes_per_task) (default V(1)).
      - Sidekiq processes are matched to instances by a label C(instance-id=<instance id>) and to tasks by a
        label C(task-id=<task id>), or else by hostname (the instance's private DNS name, or the task's network
        interface name or container id).
    type: dict
    default: {}
  aws_task_protection_minutes:
    description:
      - Minutes that ECS task scale-in protection lasts, from V(1) to V(2880). Runs renew it for leaving and
        busy tasks once half of it has passed.
      - ECS deployments also wait for protected tasks, so this is the longest a deployment waits for a task
        protected by an autoscaler that stopped running.
    type: int
    default: 15
"""
