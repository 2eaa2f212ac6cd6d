#!/usr/bin/python
"""A module that returns an empty autoscale plan at once: the floor of the autoscale_run benchmark.

It takes the arguments of the autoscale task in playbooks/autoscale.yml and runs on the control host like
sidekiq_ops.fleet.autoscale does. So the floor includes Ansible's cost of templating those arguments and of shipping
and starting a Python module, and leaves only the autoscale work on top.
"""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    # Every argument that the playbook's autoscale task passes, accepted as it comes.
    names = (
        "pools", "singleton_queues", "pools_filter", "backend", "fleet", "shutdown_margin", "start_timeout",
        "instances", "redis_namespace", "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
        "redis_socket_timeout",
    )  # fmt: skip
    spec = {name: {"type": "raw"} for name in names}
    spec["redis_url"] = {"type": "str", "no_log": True}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    module.exit_json(
        changed=False,
        lock_held=False,
        actions_planned=False,
        problems=[],
        starts={},
        stops={},
        pools={},
        log_lines=["autoscale_noop: no pool decided"],
    )


if __name__ == "__main__":
    main()
