"""Names and official weights of the CSIRO Image2Biomass targets (docs/FORMATS.md, biomass)."""
from __future__ import annotations

# Order used everywhere in the package: the three components, then the two sums.
TARGETS = ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g")
COMPONENTS = ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g")
OFFICIAL_WEIGHTS = {"Dry_Green_g": 0.1, "Dry_Dead_g": 0.1, "Dry_Clover_g": 0.1,
                    "GDM_g": 0.2, "Dry_Total_g": 0.5}
TRAIN_COLUMNS = ("sample_id", "image_path", "Sampling_Date", "State", "Species",
                 "Pre_GSHH_NDVI", "Height_Ave_cm", "target_name", "target")
TEST_COLUMNS = ("sample_id", "image_path", "target_name")
SOLUTION_COLUMNS = ("sample_id", "target")
ID_SEP = "__"


def official_weight_vector() -> list[float]:
    return [OFFICIAL_WEIGHTS[t] for t in TARGETS]
