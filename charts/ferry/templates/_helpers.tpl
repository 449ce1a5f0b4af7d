{{/* Chart name, truncated to 63 characters. */}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every resource name. Kept at most 40 characters so that
"<fullname>-etcd-headless" and friends stay valid DNS labels. */}}
{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ferry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "ferry.labels" -}}
helm.sh/chart: {{ include "ferry.chart" . }}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator. */}}
{{- define "ferry.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector labels of etcd. */}}
{{- define "ferry.etcd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: etcd
{{- end }}

{{- define "ferry.operator.fullname" -}}
{{- printf "%s-operator" (include "ferry.fullname" .) }}
{{- end }}

{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ferry.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ferry.leaseName" -}}
{{- default (include "ferry.operator.fullname" .) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{- define "ferry.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}

{{- define "ferry.operator.image" -}}
{{- include "ferry.image" (dict "repository" .Values.image.repository "tag" .Values.image.tag "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "ferry.sidecar.image" -}}
{{- include "ferry.image" (dict "repository" .Values.sidecar.image.repository "tag" .Values.sidecar.image.tag "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "ferry.etcd.fullname" -}}
{{- printf "%s-etcd" (include "ferry.fullname" .) }}
{{- end }}

{{- define "ferry.etcd.headless" -}}
{{- printf "%s-etcd-headless" (include "ferry.fullname" .) }}
{{- end }}

{{/* True (non-empty) when the chart runs its own etcd. */}}
{{- define "ferry.etcd.internal" -}}
{{- if not .Values.etcd.external.endpoints }}true{{ end }}
{{- end }}

{{/* The etcd client URLs, comma-separated: the external ones, or one per member of the
chart's etcd (stable per-pod names through the headless Service). */}}
{{- define "ferry.etcd.endpoints" -}}
{{- if .Values.etcd.external.endpoints }}
{{- join "," .Values.etcd.external.endpoints }}
{{- else }}
{{- $urls := list }}
{{- $name := include "ferry.etcd.fullname" . }}
{{- $headless := include "ferry.etcd.headless" . }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc.%s:%d" $name $i $headless $.Release.Namespace $.Values.clusterDomain (int $.Values.etcd.clientPort)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}
{{- end }}

{{- define "ferry.identity.service" -}}
{{- printf "%s-identity" (include "ferry.fullname" .) }}
{{- end }}

{{- define "ferry.webhook.service" -}}
{{- printf "%s-webhook" (include "ferry.fullname" .) }}
{{- end }}

{{- define "ferry.webhook.secret" -}}
{{- printf "%s-webhook-tls" (include "ferry.fullname" .) }}
{{- end }}

{{- define "ferry.sidecar.configMap" -}}
{{- printf "%s-sidecar" (include "ferry.fullname" .) }}
{{- end }}
