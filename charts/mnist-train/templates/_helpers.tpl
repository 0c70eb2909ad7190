{{/* Names and labels every template uses (the helm create scaffold's helpers, as in charts/mnist-serve). */}}

{{/* The chart's name, or nameOverride; 63 characters at most, a Kubernetes name's limit. */}}
{{- define "mnist-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
release-chart, or the release alone when it already contains the chart's name, or fullnameOverride. The Job
and its headless Service both take this name; a pod's host name is JOB-INDEX, so it is cut at 56 characters
to leave room for "-" and a rank of up to six digits within a DNS label's 63.
*/}}
{{- define "mnist-train.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "mnist-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard app.kubernetes.io labels, on every resource. */}}
{{- define "mnist-train.labels" -}}
helm.sh/chart: {{ include "mnist-train.chart" . }}
{{ include "mnist-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mnist-serve
{{- end }}

{{/* What the headless Service and the NetworkPolicy select the ranks' pods by. */}}
{{- define "mnist-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mnist-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: training
{{- end }}

{{/* repository@digest when a digest is given, else repository:tag (default: appVersion-cpu-train or -gpu-train). */}}
{{- define "mnist-train.image" -}}
{{- $tag := default (printf "%s-%s-train" .Chart.AppVersion (ternary "gpu" "cpu" .Values.gpu.enabled)) .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* cpu or cuda: the device value, or cuda when gpu.enabled. */}}
{{- define "mnist-train.device" -}}
{{- default (ternary "cuda" "cpu" .Values.gpu.enabled) .Values.device }}
{{- end }}

{{/* Rank 0's address as every rank resolves it: its pod's host name under the headless Service (JOB-0.SERVICE). */}}
{{- define "mnist-train.rendezvousAddress" -}}
{{- printf "%s-0.%s" (include "mnist-train.fullname" .) (include "mnist-train.fullname" .) }}
{{- end }}
