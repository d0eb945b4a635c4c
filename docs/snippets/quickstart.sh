# A generated stream, questions about its past as it streams, answers beside
# the truth, and a picture of what was retrieved for the deepest question.
mukv demo --plot timeline.png
