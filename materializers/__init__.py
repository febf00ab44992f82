from materializers.dataset import ConversationDatasetMaterializer
from materializers.folders import AdapterFolderMaterializer, ModelFolderMaterializer
from materializers.reports import ReportMaterializer

__all__ = ["ConversationDatasetMaterializer", "AdapterFolderMaterializer", "ModelFolderMaterializer",
           "ReportMaterializer"]
