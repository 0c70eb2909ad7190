"""What a rollout raises: a failure the command reports, and a failure of the new version that is then undone."""

from registry.store import RegistryError


class RolloutError(RegistryError):
    """The rollout could not be done, or was undone; the message is one line saying why and where things are."""


class RolloutFailed(Exception):
    """The new version failed on the cluster (a pod, the deadline or the check); the rollout is undone."""
