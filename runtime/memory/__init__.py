"""HELM's Episodic Memory Module (EMM): keyframes of the task history, retrieved by cosine
similarity of image + subgoal-text embeddings, with rollback targets and atomic persistence.

Core code: numpy, plus FAISS for the approximate index of large stores; no ROS imports.
"""
from runtime.memory.keyframe import KINDS, Keyframe, ObjectPose, RobotState
from runtime.memory.store import EmbeddingIndex, EpisodicMemory, Match, MemoryConfig, MemoryFormatError

__all__ = ["KINDS", "EmbeddingIndex", "EpisodicMemory", "Keyframe", "Match", "MemoryConfig", "MemoryFormatError",
           "ObjectPose", "RobotState"]
