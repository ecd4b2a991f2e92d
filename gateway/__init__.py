"""Tidegate's data plane: a forward proxy that allows destinations by domain name.

Layers, from the inside out (each imports only the ones above it):

- ``hosts`` / ``addresses``: normalise what a client typed into one canonical host, and
  classify IP addresses for the SSRF guard. Pure functions.
- ``model`` / ``documents``: the EgressPolicy / EgressGateway API as typed values, parsed
  and validated from the same YAML one would ``kubectl apply``.
- ``bundle``: compile documents into the versioned JSON bundle the operator writes into a
  ConfigMap, and load it back.
- ``engine``: the decision (allow | deny | audit, with a reason) - pure, indexed so its
  cost does not grow with the number of rules.
- ``dns``, ``tls``, ``proxy``, ``admin``, ``sources``, ``server``: the I/O around it.

The gateway never imports the operator; the two meet only at the bundle format.
"""
