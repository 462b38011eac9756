"""What each stage does: datasets, download, features, match, evaluate, report; registered with the pipeline here.

Importing this package registers, by module path only (nothing below is imported here), the stages in run
order, the dataset kinds, the demo's generated source, the commands the stages add to ``pipeline`` and the
notebook API re-exported as ``pipeline.match_images`` etc.
"""

from pipeline import registry

registry.register_stage("download", "stages.download.stage")
registry.register_stage("normalize", "stages.datasets.normalize")
registry.register_stage("features", "stages.features.stage")
registry.register_stage(
    "match", "stages.match.stage", announce="stages.commands:match_summary", status="stages.match.plan:status"
)
registry.register_stage(
    "report", "stages.report.stage", announce="stages.commands:report_index", status="stages.report.status:status"
)

registry.register_dataset_kind("tss", "stages.datasets.tss")
registry.register_dataset_kind("pf-willow", "stages.datasets.pfwillow")
registry.register_dataset_kind("pf-pascal", "stages.datasets.pfpascal")
registry.register_dataset_kind("spair", "stages.datasets.spair")
registry.register_dataset_kind("demo", "stages.datasets.demo", source="stages.datasets.demo")

registry.register_run_check("stages.commands:check_matchers_and_sweeps")
for _name in ("list", "report", "export-tss", "score-tss", "match-pair"):
    registry.register_command(_name, f"stages.commands:{_name.replace('-', '_')}_command")

registry.register_api("stages.api", ("match_images", "load_pair", "Match", "BenchmarkPair", "PairFeatures"))
