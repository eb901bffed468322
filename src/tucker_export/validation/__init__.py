"""Validation of exported deployments against the PyTorch model.

Submodules are imported explicitly (e.g. ``tucker_export.validation.metrics``) so that importing this
package stays cheap and pulls in no heavy dependency.
"""
