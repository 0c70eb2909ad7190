"""A registry version onto the serving pods of a Kubernetes cluster, checked, and taken back when it fails:
`mnist-registry promote --deployment` and `mnist-registry canary`, on plain Kubernetes (the `kubernetes` client).

A rollout pins the Deployment's pods to one version (MODEL_VERSION in the pod template, so a pod that restarts
later never picks up a newer alias target), follows the new pods one line at a time, then asks every new pod
for real test digits through a port-forward (the NetworkPolicy does not apply inside the pod): each answer must
name the version and archive checksum, and the accuracy must reach the version's own test accuracy less a
margin. A pod that fails to start (its termination message says why), a deadline passed, or a failed check puts
the Deployment and the alias back where they were, and the command fails in one line.

A canary is a second Deployment, NAME-canary, a copy of NAME's pods on another version behind the same Service;
traffic splits by replica count (no per-request weights without a mesh or a Gateway API route).

The modules, in the order they build on each other:
  errors      what a failed rollout raises
  kube        credentials for the cluster, the default namespace, an API error in one line
  deployment  where a Deployment is, its pin to a version, its pods and their state, waiting for a rollout
  pod_http    an HTTP request to one pod through a port-forward
  check       real test digits through one pod: the version it names and the accuracy it reaches
  roll        roll a Deployment onto a version; promote an alias with it, rolled back on failure
  canary      a canary Deployment beside the stable one: start, promote, abort
  traffic     how many requests each version's pods answered (canary status)"""
