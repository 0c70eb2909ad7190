{{/* Names and labels every template uses (the helm create scaffold's helpers). */}}

{{/* The chart's name, or nameOverride; 63 characters at most, a Kubernetes name's limit. */}}
{{- define "mnist-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* release-chart, or the release alone when it already contains the chart's name, or fullnameOverride. */}}
{{- define "mnist-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "mnist-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard app.kubernetes.io labels, on every resource. */}}
{{- define "mnist-serve.labels" -}}
helm.sh/chart: {{ include "mnist-serve.chart" . }}
{{ include "mnist-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* What the Deployment, Service, PDB and NetworkPolicy select the serving pods by. */}}
{{- define "mnist-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mnist-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The serving pods: the selector labels plus their component, which the test pod does not share. */}}
{{- define "mnist-serve.serverSelectorLabels" -}}
{{ include "mnist-serve.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "mnist-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mnist-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is given, else repository:tag (default: appVersion-cpu or -gpu). */}}
{{- define "mnist-serve.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion (ternary "gpu" "cpu" .Values.gpu.enabled)) .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The helm test pod's image: tests.image when set, else the serving image. */}}
{{- define "mnist-serve.testImage" -}}
{{- with .Values.tests.image }}
{{- if and .repository .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else if .repository }}
{{- printf "%s:%s" .repository (required "tests.image.tag (or digest) is required with tests.image.repository" .tag) }}
{{- else }}
{{- include "mnist-serve.image" $ }}
{{- end }}
{{- end }}
{{- end }}

{{/* The config.properties TorchServe starts from: the project's file, the page origin, then torchserve.extraProperties. */}}
{{- define "mnist-serve.configProperties" -}}
{{ .Files.Get "files/config.properties" }}
{{- with .Values.torchserve.corsAllowedOrigin }}
# torchserve.corsAllowedOrigin: the one web page origin browsers may call predictions from (CORS); the same
# lines as handler/server.py's cors_properties().
cors_allowed_origin={{ . }}
cors_allowed_methods=POST
cors_allowed_headers=Content-Type
{{- end }}
{{- with .Values.torchserve.extraProperties }}
# torchserve.extraProperties from the chart's values (the last value of a key wins).
{{- range $key, $value := . }}
{{ $key }}={{ $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The marker docker/entrypoint.py writes once the model answered a prediction (on the /tmp emptyDir);
the READY_FILE variable and the startup probe both name it.
*/}}
{{- define "mnist-serve.readyFile" -}}
/tmp/mnist-serve-ready
{{- end }}
