"""The tests' bridge to Helm's Go SDK (PyPI helm-python-sdk): one JSON
request on stdin, one JSON answer on stdout. Helm's own refusals come back as
{"error": {"type", "message"}}, so the tests can check what they say.

Requests: {"op": "lint", "chart", "values", "namespace", "strict"}
          {"op": "render", "chart", "values", "name", "namespace"}
          {"op": "install" | "upgrade", "chart", "values", "name", "namespace",
           "kubeconfig", "dry_run"}
          {"op": "uninstall", "name", "namespace", "kubeconfig"}
"""

import json
import sys

import helm_python as helm
from helm_python import _native


def answer(req):
    op = req["op"]
    values = req.get("values") or {}
    if op == "lint":
        return helm.lint(req["chart"], values, strict=req.get("strict", False), namespace=req.get("namespace"))
    if op == "render":
        with helm.Chart.load(req["chart"]) as chart:
            return chart.render(values, name=req["name"], namespace=req["namespace"])
    with helm.Config(kubeconfig_path=req["kubeconfig"], namespace=req["namespace"]) as config:
        if op in ("install", "upgrade"):
            # Config.install/upgrade do not pass server_side_apply: Helm 4
            # applies server-side by default, which API servers before 1.25
            # refuse for CRDs carrying CEL rules (`helm install
            # --server-side=false` is the CLI's way out), so call the SDK's
            # C function with the option itself.
            opts = {"namespace": req["namespace"], "timeout_seconds": 60,
                    "server_side_apply": req.get("server_side_apply", False)}
            if req.get("dry_run"):
                opts["dry_run"] = req["dry_run"]
            if op == "upgrade":
                opts["server_side_apply"] = "true" if opts["server_side_apply"] else "false"
            handle, ref = config._chart_args(req["chart"])
            payload = _native.call_string(f"helm_{op}", config._raw(), config._context_arg(None), handle, ref,
                                          req["name"], json.dumps(values), json.dumps(opts))
            return json.loads(payload)
        if op == "uninstall":
            return config.uninstall(req["name"], timeout=60)
    raise ValueError(f"unknown op {op!r}")


def main():
    req = json.load(sys.stdin)
    try:
        result = answer(req)
    except helm.HelmError as e:
        result = {"error": {"type": type(e).__name__, "message": str(e)}}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
