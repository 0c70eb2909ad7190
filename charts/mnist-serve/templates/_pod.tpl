{{/*
The serving pod: the stable Deployment's (deployment.yaml) and the canary's (canary.yaml), which differ only in
TRACK (stable or canary, a label the per-track Services and the rollout command tell them apart by) and in
VERSION, the registry version or alias their MODEL_VERSION names.
*/}}
{{- define "mnist-serve.podTemplate" -}}
{{- $root := .root }}
{{- $gpu := $root.Values.gpu -}}
metadata:
  annotations:
    # A changed config.properties changes this, and so rolls the pods (a ConfigMap change alone would not).
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $root.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "mnist-serve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: server
    mnist-serve.io/track: {{ .track }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "mnist-serve.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
  # No service environment variables: a Service named "cassandra" would otherwise set CASSANDRA_PORT
  # to tcp://..., which is not the port number the registry client reads from it.
  enableServiceLinks: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and $gpu.enabled $gpu.runtimeClassName }}
  runtimeClassName: {{ $gpu.runtimeClassName }}
  {{- end }}
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: torchserve
      image: {{ include "mnist-serve.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      env:
        - name: MODEL_SOURCE
          value: {{ $root.Values.model.source | quote }}
        - name: MODEL_VERSION
          value: {{ .version | quote }}
        - name: NUMBER_OF_GPU
          value: {{ ternary $gpu.count 0 $gpu.enabled | quote }}
        - name: TORCHSERVE_CONFIG
          value: /etc/mnist-serve/config/config.properties
        - name: READY_TIMEOUT
          value: {{ $root.Values.torchserve.readyTimeoutSeconds | quote }}
        # Written by the entrypoint once the model answered a prediction; the startup probe checks it.
        - name: READY_FILE
          value: {{ include "mnist-serve.readyFile" $root }}
        - name: STOP_TIMEOUT
          value: {{ $root.Values.torchserve.stopTimeoutSeconds | quote }}
        - name: CASSANDRA_KEYSPACE
          value: {{ $root.Values.cassandra.keyspace | quote }}
        - name: CASSANDRA_CONNECT_TIMEOUT
          value: {{ $root.Values.cassandra.connectTimeoutSeconds | quote }}
        - name: CASSANDRA_REQUEST_TIMEOUT
          value: {{ $root.Values.cassandra.requestTimeoutSeconds | quote }}
        {{- if $root.Values.astra.enabled }}
        # Files from the Secrets mounted below; training/config.py reads them, the token never enters the environment.
        - name: ASTRA_DB_SECURE_BUNDLE
          value: /etc/mnist-serve/astra-bundle/{{ $root.Values.astra.bundleSecret.key }}
        - name: ASTRA_DB_TOKEN_FILE
          value: /etc/mnist-serve/astra-token/{{ $root.Values.astra.tokenSecret.key }}
        {{- else }}
        - name: CASSANDRA_HOSTS
          value: {{ join "," $root.Values.cassandra.hosts | quote }}
        - name: CASSANDRA_PORT
          value: {{ $root.Values.cassandra.port | quote }}
        {{- with $root.Values.cassandra.auth }}
        {{- if .secretName }}
        # The role's name from its Secret; the password as a file from the volume below (registry/settings.py).
        - name: CASSANDRA_USERNAME
          valueFrom:
            secretKeyRef:
              name: {{ .secretName }}
              key: {{ .usernameKey }}
        - name: CASSANDRA_PASSWORD_FILE
          value: /etc/mnist-serve/cassandra-auth/{{ .passwordKey }}
        {{- end }}
        {{- end }}
        {{- with $root.Values.cassandra.tls }}
        {{- if .enabled }}
        - name: CASSANDRA_TLS_CA_FILE
          value: /etc/mnist-serve/cassandra-tls/ca.crt
        {{- if .clientCertificate }}
        - name: CASSANDRA_TLS_CERT_FILE
          value: /etc/mnist-serve/cassandra-tls/tls.crt
        - name: CASSANDRA_TLS_KEY_FILE
          value: /etc/mnist-serve/cassandra-tls/tls.key
        {{- end }}
        - name: CASSANDRA_TLS_VERIFY_HOSTNAME
          value: {{ .verifyHostname | quote }}
        {{- end }}
        {{- end }}
        {{- end }}
      ports:
        # Only these two are declared. TorchServe's management API listens on 127.0.0.1 inside the
        # pod (handler/config.properties) and is named nowhere, so nothing can route to it.
        - name: http
          containerPort: 8080
          protocol: TCP
        - name: metrics
          containerPort: 8082
          protocol: TCP
      # Started means "answers a prediction now": /ping says Healthy seconds before the workers
      # answer (measured: tests/test_container.py), so startup checks the entrypoint's marker.
      startupProbe:
        exec:
          command: ["test", "-e", {{ include "mnist-serve.readyFile" $root }}]
        periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
        timeoutSeconds: {{ $root.Values.probes.startup.timeoutSeconds }}
        failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /ping
          port: http
        periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $root.Values.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /ping
          port: http
        periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
      {{- if gt (int $root.Values.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ $root.Values.preStopSleepSeconds }}
      {{- end }}
      # The entrypoint writes why it failed (unknown version, registry down, damaged archive) to
      # /dev/termination-log; when it could not, the end of the log is shown instead.
      terminationMessagePolicy: FallbackToLogsOnError
      resources:
        {{- $resources := deepCopy $root.Values.resources }}
        {{- if $gpu.enabled }}
        {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpu.count) (default (dict) $resources.limits)) }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/mnist-serve/config
          readOnly: true
        {{- if $root.Values.astra.enabled }}
        - name: astra-bundle
          mountPath: /etc/mnist-serve/astra-bundle
          readOnly: true
        - name: astra-token
          mountPath: /etc/mnist-serve/astra-token
          readOnly: true
        {{- else }}
        {{- if $root.Values.cassandra.auth.secretName }}
        - name: cassandra-auth
          mountPath: /etc/mnist-serve/cassandra-auth
          readOnly: true
        {{- end }}
        {{- if $root.Values.cassandra.tls.enabled }}
        - name: cassandra-tls
          mountPath: /etc/mnist-serve/cassandra-tls
          readOnly: true
        {{- end }}
        {{- end }}
        # The only writable paths (the root filesystem is read-only): see the image's ENV.
        - name: tmp
          mountPath: /tmp
        - name: logs
          mountPath: /home/model-server/logs
        - name: model-store
          mountPath: /home/model-server/model-store
  volumes:
    - name: config
      configMap:
        name: {{ include "mnist-serve.fullname" $root }}
    {{- if $root.Values.astra.enabled }}
    - name: astra-bundle
      secret:
        secretName: {{ required "astra.bundleSecret.name is required when astra.enabled" $root.Values.astra.bundleSecret.name }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.astra.bundleSecret.key }}
            path: {{ $root.Values.astra.bundleSecret.key }}
    - name: astra-token
      secret:
        secretName: {{ required "astra.tokenSecret.name is required when astra.enabled" $root.Values.astra.tokenSecret.name }}
        defaultMode: 0440
        items:
          - key: {{ $root.Values.astra.tokenSecret.key }}
            path: {{ $root.Values.astra.tokenSecret.key }}
    {{- else }}
    {{- with $root.Values.cassandra.auth }}
    {{- if .secretName }}
    - name: cassandra-auth
      secret:
        secretName: {{ .secretName }}
        defaultMode: 0440
        items:
          - key: {{ .passwordKey }}
            path: {{ .passwordKey }}
    {{- end }}
    {{- end }}
    {{- with $root.Values.cassandra.tls }}
    {{- if .enabled }}
    - name: cassandra-tls
      secret:
        secretName: {{ required "cassandra.tls.secretName is required when cassandra.tls.enabled" .secretName }}
        defaultMode: 0440
        items:
          - key: ca.crt
            path: ca.crt
          {{- if .clientCertificate }}
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
          {{- end }}
    {{- end }}
    {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.tmpSizeLimit }}
    - name: logs
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.logsSizeLimit }}
    - name: model-store
      emptyDir:
        sizeLimit: {{ $root.Values.scratch.modelStoreSizeLimit }}
  {{- $nodeSelector := merge (deepCopy $root.Values.nodeSelector) (ternary $gpu.nodeSelector (dict) $gpu.enabled) }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := concat $root.Values.tolerations (ternary $gpu.tolerations (list) $gpu.enabled) }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.topologySpreadConstraints }}
  {{- $constraints := list }}
  {{- range . }}
  {{- $constraints = append $constraints (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" (include "mnist-serve.serverSelectorLabels" $root | fromYaml)))) }}
  {{- end }}
  topologySpreadConstraints:
    {{- toYaml $constraints | nindent 4 }}
  {{- end }}
{{- end }}
