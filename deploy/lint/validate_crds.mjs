// Validates KEDA ScaledObjects and prometheus-operator ServiceMonitors against the schemas
// published on npm as @kubernetes-models/keda and @kubernetes-models/prometheus-operator
// (generated from the projects' CRDs; pinned in deploy/lint/package.json).
// Input on stdin: [{file, doc}] (check_deploy.py crds). Exit 1 on any error.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};
const items = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const { file, doc } of items) {
  const Model = models[`${doc.apiVersion}/${doc.kind}`];
  const what = `${file} ${doc.kind}/${doc.metadata?.name}`;
  if (!Model) {
    console.log(`  FAIL ${what}: no schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`  ok   ${what} (CRD schema)`);
  } catch (err) {
    const details = (err.errors ?? []).map((e) => `${e.instancePath} ${e.message}`).join("; ");
    console.log(`  FAIL ${what}: ${details || err.message}`);
    failed++;
  }
}
if (items.length === 0) {
  console.log("  FAIL no ScaledObject/ServiceMonitor found to validate");
  failed++;
}
process.exit(failed ? 1 : 0);
