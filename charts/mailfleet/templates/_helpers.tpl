{{/* Names, labels and images shared by the templates. */}}

{{- define "mailfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The operator pods' selector. app.kubernetes.io/name is mailfleet.specs.common.OPERATOR_LABELS: the mail
nodes' NetworkPolicy admits the pods that carry it to their HTTP port. */}}
{{- define "mailfleet.selectorLabels" -}}
app.kubernetes.io/name: mailfleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mailfleet.labels" -}}
{{ include "mailfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mailfleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "mailfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mailfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mailfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "mailfleet.nodeImage" -}}
{{- $repository := .Values.nodeImage.repository | default .Values.image.repository -}}
{{- $tag := .Values.nodeImage.tag | default .Values.image.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/* kopf's liveness endpoint (`mailfleet operator --liveness`), which the probes ask. */}}
{{- define "mailfleet.healthPort" -}}8081{{- end -}}
