{{/* Full name of the release's objects, at most 63 characters. */}}
{{- define "tether.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tether.operatorName" -}}
{{- printf "%s-operator" (include "tether.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tether.selectorLabels" -}}
app.kubernetes.io/name: tether-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tether.labels" -}}
{{ include "tether.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tether
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tether.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tether.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The rules the operator needs on pools and their children (namespaced resources). */}}
{{- /*
Rights on Secrets and Pods: cluster-wide in the ClusterRole (or in the watched
namespace's Role), or, with `tenantNamespaces`, only in those namespaces.
*/ -}}
{{- define "tether.tenantRules" -}}
# Pods: the operator writes each gateway pod's instruction annotation (patch; not
# limitable by name: pods come and go), lists a pool's pods for their revision during a
# rollout and deletes the drained ones so that the StatefulSet (OnDelete) recreates them
# at the new revision. It also needs get/list/watch itself to grant them to the gateway
# Role (RBAC forbids granting what one does not hold). It does not watch pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# Secrets: read by name, to check that the Secrets a pool references exist (their names
# are the pools' choice, so not limitable by name); no list or watch, so the operator
# never holds Secret contents it was not pointed at. Created for the one Secret it owns,
# a managed NATS's generated token (`create` cannot be limited by name in RBAC); never
# deleted by the operator: the token carries the pool's ownerReference and the garbage
# collector deletes it with the pool.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# PersistentVolumeClaims: a managed NATS's volumes grow in place when `delivery.storage`
# grows (docs/operator.md, "Immutable fields"); never created or deleted by the operator
# (the StatefulSet controller makes them).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "patch"]
{{- end -}}

{{- define "tether.poolRules" -}}
- apiGroups: ["tether.dev"]
  resources: ["connectionpools"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["tether.dev"]
  resources: ["connectionpools/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- if not .Values.tenantNamespaces }}
{{ include "tether.tenantRules" . }}
{{- end }}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# The StatefulSet controller's FailedCreate Events (a ResourceQuota refusing a pod),
# listed by involvedObject only while a pool's StatefulSet is short of pods, to show them
# as the pool's PodsCreatable condition. No watch: a cluster's Events are many.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list"]
{{- end -}}
