{{/*
Standard helpers (the prometheus-community set): name, fullname, chart, labels,
selectorLabels, serviceAccountName, image. Kubernetes names are limited to 63
characters, so every generated name is trimmed.
*/}}

{{/* Chart name, or nameOverride. */}}
{{- define "aisetl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every resource name: fullnameOverride, else the release name if it
already contains the chart name, else "<release>-<chart>".
*/}}
{{- define "aisetl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "aisetl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels on every resource. app.kubernetes.io/part-of is what transformer pods,
ETL declarations and chart resources have in common.
*/}}
{{- define "aisetl.labels" -}}
helm.sh/chart: {{ include "aisetl.chart" . }}
{{ include "aisetl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aisetl
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Selector labels: only name and instance, because a workload's selector cannot
change after install. Workloads add app.kubernetes.io/component themselves.
*/}}
{{- define "aisetl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aisetl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
ServiceAccount of one component.
Usage: include "aisetl.serviceAccountName" (dict "context" $ "component" "gateway")
*/}}
{{- define "aisetl.serviceAccountName" -}}
{{- $ctx := .context -}}
{{- $sa := (index $ctx.Values .component).serviceAccount -}}
{{- if $sa.create -}}
{{- default (printf "%s-%s" (include "aisetl.fullname" $ctx | trunc 54 | trimSuffix "-") .component) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference "repository:tag[@digest]"; the tag defaults to appVersion.
Usage: include "aisetl.image" (dict "image" .Values.image "context" $)
*/}}
{{- define "aisetl.image" -}}
{{- $tag := .image.tag | default .context.Chart.AppVersion | toString -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's resources: "<fullname>-<component>". */}}
{{- define "aisetl.componentName" -}}
{{- printf "%s-%s" (include "aisetl.fullname" .context | trunc 54 | trimSuffix "-") .component -}}
{{- end -}}

{{/* The settings ConfigMap that both roles read through envFrom. */}}
{{- define "aisetl.configName" -}}
{{- printf "%s-config" (include "aisetl.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/* In-cluster URL of the gateway Service. */}}
{{- define "aisetl.gatewayURL" -}}
{{- printf "http://%s.%s.svc:%v" (include "aisetl.componentName" (dict "context" . "component" "gateway")) .Release.Namespace .Values.gateway.service.port -}}
{{- end -}}

{{/*
Values that contradict each other fail the render with a message that says
which values and what to do. Included once, from the target DaemonSet.
*/}}
{{- define "aisetl.validate" -}}
{{- $p := .Values.persistence -}}
{{- if and $p.hostPath.enabled $p.persistentVolumeClaim.enabled -}}
{{- fail "persistence.hostPath.enabled and persistence.persistentVolumeClaim.enabled are both true: targets keep their objects in exactly one place. Set one of them to false." -}}
{{- end -}}
{{- if not (or $p.hostPath.enabled $p.persistentVolumeClaim.enabled) -}}
{{- fail "persistence.hostPath.enabled and persistence.persistentVolumeClaim.enabled are both false: targets need a data volume that survives pod restarts. Enable one of them." -}}
{{- end -}}
{{- $seen := dict -}}
{{- range .Values.etls -}}
{{- $key := lower .id -}}
{{- if hasKey $seen $key -}}
{{- fail (printf "etls: two entries have the id %q (ids are compared lowercased, because the ConfigMap is named aisetl-etl-%s). Give each ETL its own id." .id $key) -}}
{{- end -}}
{{- $_ := set $seen $key true -}}
{{- if not (regexMatch "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$" .id) -}}
{{- fail (printf "etls: id %q cannot name a Kubernetes object: the ConfigMap aisetl-etl-%s must be a DNS subdomain and the transformer pods' label aisetl.io/etl-id at most 63 characters. On Kubernetes use letters, digits and '-' only, starting and ending with a letter or digit, at most 63 characters." .id $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The target's data volume mount. On a shared claim every node's target uses the
sub-path named after its node, so it finds its own objects after a restart.
*/}}
{{- define "aisetl.target.dataMount" -}}
- name: data
  mountPath: /var/lib/aisetl
  {{- if .Values.persistence.persistentVolumeClaim.enabled }}
  subPathExpr: $(K8S_HOST_NAME)
  {{- end }}
{{- end -}}

{{/* Claim of the targets' data when persistence.persistentVolumeClaim is on. */}}
{{- define "aisetl.target.claimName" -}}
{{- .Values.persistence.persistentVolumeClaim.existingClaim | default (printf "%s-data" (include "aisetl.fullname" . | trunc 58 | trimSuffix "-")) -}}
{{- end -}}
