"""Elastune on Kubernetes: the ElastuneJob resource, its CRD, and the pure rules the operator
(operators/elastune_operator.py) applies: the objects a job needs and the status it shows."""
