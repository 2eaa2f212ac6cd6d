"""Documentation of the Kubernetes connection options of the modules that scale pools on Kubernetes."""

from __future__ import annotations


class ModuleDocFragment:
    # Keep in step with KUBERNETES_ARGUMENT_SPEC in plugins/module_utils/scaling_kubernetes.py.
    DOCUMENTATION = r"""
options:
  kubeconfig:
    description:
      - Path to a kubeconfig file, or the kubeconfig's content as a dictionary.
      - Falls back to E(K8S_AUTH_KUBECONFIG). Without it, and without O(host) with credentials, the module uses
        the ServiceAccount of the pod it runs in, then the default kubeconfig (E(KUBECONFIG) or C(~/.kube/config)).
    type: raw
  context:
    description:
      - Context of the kubeconfig to use. Falls back to E(K8S_AUTH_CONTEXT), then to the current context.
    type: str
  host:
    description:
      - URL of the Kubernetes API server, for example V(https://10.0.0.1:6443). Falls back to E(K8S_AUTH_HOST).
      - With O(api_key), or with O(client_cert) and O(client_key), no kubeconfig is loaded.
    type: str
  api_key:
    description:
      - Bearer token for the API server. Falls back to E(K8S_AUTH_API_KEY). Never shown in results or logs.
    type: str
  validate_certs:
    description:
      - Verify the API server's TLS certificate. Falls back to E(K8S_AUTH_VALIDATE_CERTS), then to the kubeconfig.
    type: bool
    aliases: [verify_ssl]
  ca_cert:
    description:
      - PEM file of the certificate authority that signs the API server's certificate.
        Falls back to E(K8S_AUTH_CA_CERT).
    type: path
    aliases: [ssl_ca_cert]
  client_cert:
    description:
      - PEM file of a client certificate for the API server, with O(client_key). Falls back to
        E(K8S_AUTH_CLIENT_CERT).
    type: path
    aliases: [cert_file]
  client_key:
    description:
      - PEM file of the key of O(client_cert). Falls back to E(K8S_AUTH_CLIENT_KEY).
    type: path
    aliases: [key_file]
  proxy:
    description:
      - URL of an HTTP proxy for the API server. Falls back to E(K8S_AUTH_PROXY).
    type: str
  no_proxy:
    description:
      - Comma-separated hosts to reach without O(proxy). Falls back to E(K8S_AUTH_NO_PROXY).
    type: str
  request_timeout:
    description:
      - Seconds to wait for each API request. Calls are not retried within a run; the next run tries again.
    type: float
    default: 10.0
requirements:
  - kubernetes (the Python client) for the Python that runs the module
notes:
  - Option names and E(K8S_AUTH_*) environment variables follow kubernetes.core. Its username and password are
    not supported, because Kubernetes 1.19 removed basic authentication from the API server.
"""
