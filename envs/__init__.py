"""Gymnasium environments of the project, installed as ``rlprox.envs``.

Importing this package registers them under the ``rlprox/`` namespace (so recipes can
say ``env: {id: rlprox/Name-v0}``). It holds none yet; PolicyFlow's MultiGoal lands
with its issue.
"""
