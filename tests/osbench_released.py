"""The released OSBench scorer's judge prompts and settings, quoted for comparison.

Quoted from github.com/LAW1223/OpenSubject:
  osbench/prompt_generator.py  @ b483adb731c53df3afadd0180e5930fd26dae2ed
  osbench/openai_util.py       @ b483adb731c53df3afadd0180e5930fd26dae2ed
  osbench/osbench_score.py     @ 021a9ba213930aff56a74b83eabc707f8ea044cb
  osbench/test_osbench_score.py @ 021a9ba213930aff56a74b83eabc707f8ea044cb
The prompt strings are verbatim (trailing spaces included); SETTINGS restates what those
files do, one fact per key. tests/test_osbench.py diffs this project's protocol against
it. (The released single-subject generation PF prompt is left out: its scorer never
selects it.)
"""

# prompt_generator.py: _context_no_delimit, prefixed to every prompt
CONTEXT = (
    "You are a professional digital artist tasked with evaluating the effectiveness of AI-generated images based on specific rules.\n"
    "\n"
    "All input images, including all humans depicted, are AI-generated. You do not need to consider any privacy or confidentiality concerns.\n"
    "\n"
    "IMPORTANT: Your response must follow this format (keep your reasoning concise and to the point):\n"
    "{\n"
    "  \"score\": <score>,\n"
    "  \"reasoning\": \"...\"\n"
    "}\n"
)

# _prompts_0shot_subject_driven_generation_rule_PF_Multiple
PF_GENERATION = (
    "\n"
    "### Task: Rate from 0 to 10\n"
    "Evaluate how well the **final image** fulfills the **instruction**, **regardless of whether subject identities are preserved**.\n"
    "\n"
    "#### **Scoring Criteria**\n"
    "\n"
    "- **0:** The image *completely fails* to implement the instruction.  \n"
    "- **1-3:** The image responds to the instruction *mostly incorrectly*, with major deviations or missing actions.  \n"
    "- **4-6:** The image reflects *some aspects* of the instruction but with significant omissions, errors, or misapplied details.  \n"
    "- **7-9:** The image *mostly fulfills* the instruction, with only minor inaccuracies or incomplete elements.  \n"
    "- **10:** The image *fully and accurately* accomplishes all aspects of the editing instruction.\n"
    "\n"
    "#### **Pay special attention to**\n"
    "\n"
    "- **Composition and spatial arrangement:** Are objects or subjects in preceding images placed correctly according to the instruction?\n"
    "- **Environmental adjustments:** If the instruction involves scene context (e.g., background, weather, lighting), are they correctly updated?  \n"
    "- **Pose and action:** Do the body posture, gesture, or orientation match the requested edit?  \n"
    "- **Presence or absence of elements:** Are the specified objects or subjects correctly added, removed, or modified?  \n"
    "- **Interaction and relation:** Are spatial or physical interactions (e.g., “holding,” “sitting next to”) accurately depicted?  \n"
    "\n"
    "#### **Important Notes**\n"
    "\n"
    "- Focus **only** on whether the requested modifications are correctly applied.  \n"
    "- **Do not** consider the identity consistency of subjects or whether the correct individuals/objects are retained — that will be evaluated separately.  \n"
    "- **Do not** assess the artistic quality, realism, or aesthetic appeal — only whether the **task has been executed as instructed**.  \n"
    "- **Scoring should be strict** — assign high scores only if the instruction is clearly, completely, and accurately fulfilled.\n"
    "\n"
    "**Editing instruction:** `<instruction>`\n"
)

# _prompts_0shot_subject_driven_generation_rule_SC_Single_and_Multiple
SC_GENERATION = (
    "\n"
    "### Setting\n"
    "You are given multiple images:\n"
    "- The **first image** is the **ground truth (reference)**, serving as a visual standard for assessing scene similarity.  \n"
    "- The **second image** is the **model's output image**, which you need to evaluate.\n"
    "\n"
    "### Task: Rate from 0 to 10\n"
    "Evaluate whether the **identities of subjects** in the **final image** match those of the corresponding individuals in the **first images**.\n"
    "\n"
    "#### **Scoring Criteria**\n"
    "\n"
    "- **0:** The subject identities in the image are *completely inconsistent* with those in the reference images.  \n"
    "- **1-3:** The identities are *severely inconsistent*, showing only a few minor resemblances.  \n"
    "- **4-6:** The image displays *some notable similarities*, but major inconsistencies remain — indicating a *moderate* level of identity match.  \n"
    "- **7-9:** The identities are *mostly consistent*, with only subtle or localized mismatches.  \n"
    "- **10:** The subject identities in the final image are *perfectly consistent* with those in the reference images.\n"
    "\n"
    "#### **Pay special attention to**\n"
    "\n"
    "- **Facial and cranial features:** Match in the appearance and placement of eyes, nose, mouth, cheekbones, jawline, wrinkles, makeup, hairstyle, hair color, and overall head shape.  \n"
    "- **Correct identity usage:** Verify that the proper individuals or objects from the input images are used (no identity swaps or omissions).  \n"
    "- **Physical traits:** Check that body shape, skin tone, and other defining physical attributes remain consistent, without distortion or abnormal anatomy.  \n"
    "- **Clothing and accessories:** If the instruction does *not* request changes to clothing or hairstyle, ensure these remain consistent with the input images.  \n"
    "- **Subtle identity cues:** Look for alignment in facial expression, proportions, and unique personal features (e.g., freckles, scars, glasses).\n"
    "\n"
    "#### **Important Notes**\n"
    "\n"
    "- **Deduct points** for each visible identity mismatch or inconsistency.\n"
    "- **Deduct points** for each unreasonable lighting on the face. Please use the **first image** as a reference.\n"
    "- The score must reflect the **identity consistency** across all objects mentioned in the instruction, please use the first image as a reference.  \n"
    "- **Scoring should be strict** — high scores should only be given when identity match is clearly strong and consistent throughout.\n"
    "\n"
    "**Editing instruction:** `<instruction>`\n"
)

# _prompts_0shot_reference_based_subject_manipulation_rule_PF_Single_and_Multiple
PF_MANIPULATION = (
    "\n"
    "### Setting\n"
    "You are given multiple images:\n"
    "- The **first image** is the **ground truth (reference)**, serving as a visual standard for assessing scene similarity.  \n"
    "- The **second image** is the **model's output image**, which you need to evaluate.\n"
    "\n"
    "### Task: Rate from 0 to 10\n"
    "Evaluate whether the **subject from the reference image** has been correctly and faithfully **manipulated or integrated** into the **base image**, in accordance with the **editing instruction**.\n"
    "\n"
    "#### **Scoring Criteria**\n"
    "\n"
    "- **0:** The manipulation *completely failed* — the reference subject is missing or unrecognizable.  \n"
    "- **1-3:** The manipulation is *severely incorrect*, showing only vague or partial resemblance to the reference subject.  \n"
    "- **4-6:** The manipulation is *partially successful* — some recognizable traits of the reference subject appear, but major inconsistencies remain.  \n"
    "- **7-9:** The manipulation is *mostly accurate*, with strong resemblance to the reference subject and only minor mismatches.  \n"
    "- **10:** The manipulation is *perfectly successful* — the subject is seamlessly and accurately represented, matching the reference in identity, structure, and style.\n"
    "\n"
    "#### **Pay special attention to**\n"
    "\n"
    "- **Identity fidelity:** Facial structure, hairstyle, clothing, and other distinctive features should closely match the reference subject.  \n"
    "- **Pose and spatial alignment:** The manipulated subject should align naturally with the scene's geometry, position, and orientation in the base image.  \n"
    "- **Expression and attributes:** Facial expressions and physical traits (e.g., age, gender, skin tone) should remain consistent with the reference.  \n"
    "- **Semantic correctness:** The correct individual or object from the reference should appear exactly where specified by the instruction.  \n"
    "- **Selective manipulation:** Only the target subject should be replaced or modified — no unintended entities should appear or disappear.\n"
    "\n"
    "#### **Important Notes**\n"
    "\n"
    "- **Deduct points** for every visible mismatch in identity, shape, or manipulation accuracy.  \n"
    "- Do *not* consider **background consistency**, **artifact realism**, or **aesthetic appeal** — focus exclusively on the correctness of the subject manipulation itself.  \n"
    "- The final score should reflect **how accurately and faithfully the model followed the instruction to manipulate or replace the subject**.  \n"
    "- **Scoring should be strict** — assign high scores only when the manipulated subject strongly and consistently matches the reference.\n"
    "\n"
    "**Editing instruction:** `<instruction>`\n"
)

# _prompts_0shot_reference_based_subject_manipulation_rule_SC_Single_and_Multiple
SC_MANIPULATION = (
    "\n"
    "### Setting\n"
    "You are given multiple images:\n"
    "- The **first image** is the **ground truth (reference)**, serving as a visual standard for assessing scene similarity.  \n"
    "- The **second image** is the **model's output image**, which you need to evaluate.  \n"
    "\n"
    "### Task: Rate from 0 to 10\n"
    "Evaluate how well the **non-edited regions** of the **model's output image** remain consistent with the **reference image**, focusing solely on the **unchanged parts of the scene**.\n"
    "\n"
    "This evaluation measures **scene preservation**, not subject replacement accuracy.\n"
    "\n"
    "#### **Scoring Criteria**\n"
    "\n"
    "- **0:** The image is *completely inconsistent* — large portions of the original scene are altered, distorted, or missing.  \n"
    "- **1-3:** The overall scene has *major inconsistencies*, with substantial background changes or unnatural modifications.  \n"
    "- **4-6:** The main structure of the scene is *partially preserved*, but noticeable distortions, lighting shifts, or color inconsistencies remain.  \n"
    "- **7-9:** The scene is *mostly consistent*, with only minor local deviations or blending artifacts in non-target regions.  \n"
    "- **10:** The scene is *perfectly consistent* — all unedited regions are visually identical to the reference, with no perceptible changes.\n"
    "\n"
    "#### **Pay special attention to**\n"
    "\n"
    "- **Background integrity:** Buildings, furniture, landscape, and other static elements should remain identical to the reference.  \n"
    "- **Lighting and tone stability:** Global illumination, color temperature, and shading should remain consistent across the entire scene.  \n"
    "- **Texture and color fidelity:** Non-edited areas should preserve the same texture, hue, and contrast as in the reference.  \n"
    "- **Spatial structure:** Perspective, geometry, and layout of the environment should be unchanged.  \n"
    "- **Boundary transitions:** The area surrounding the edited region should blend smoothly into the preserved background without distortion or ghosting.\n"
    "\n"
    "#### **Important Notes**\n"
    "\n"
    "- Deduct points for any visible deviation, distortion, or inconsistency in regions **unrelated to the instructed edit**.  \n"
    "- Do *not* evaluate the accuracy of the replaced subject or the realism of the edit itself — focus **only** on the similarity of **unchanged areas**.  \n"
    "- The score should reflect **how faithfully the original scene was preserved** apart from the intended modification.  \n"
    "- **Scoring should be strict** — even small but noticeable inconsistencies should lower the score.\n"
)

# PromptGenerator: CONTEXT + rubric, then "<instruction>" replaced by the instruction
PROMPTS = {"pf_generation": CONTEXT + PF_GENERATION, "sc_generation": CONTEXT + SC_GENERATION,
           "pf_manipulation": CONTEXT + PF_MANIPULATION, "sc_manipulation": CONTEXT + SC_MANIPULATION}
PLACEHOLDER = "<instruction>"

# What the released code does around the prompts, one fact per key.
SETTINGS = {
    # osbench_score.py: PF of generation gets every image, the other axes the last two
    # (test_osbench_score.py passes inputs + [ground truth] + [output])
    "images.pf_generation": "inputs, ground_truth, output",
    "images.sc_generation": "ground_truth, output",
    "images.pf_manipulation": "ground_truth, output",
    "images.sc_manipulation": "ground_truth, output",
    # openai_util.prepare_prompt / ask_gpt4o
    "message.order": "text, images",
    "message.system": "none",
    "message.roles": "user",
    "judge.model": "gpt-4.1",
    "judge.max_tokens": "1400",
    "judge.sampling": "API default",
    "image.encoding": "JPEG, PIL default quality (75)",
    # test_osbench_score.process_single_item, then load_image() on every image sent
    "image.inputs": "scaled to 1024x1024 pixels of area if larger, each side floored to a multiple of 16, "
                    "then EXIF-transposed",
    "image.output": "converted to RGB, resized to the first input's size, then EXIF-transposed",
    "image.ground_truth": "EXIF-transposed",
    # osbench_score.OSBenchScore.evaluate
    "retry.prompt": "the same prompt",
    "retry.max_tries": "10",
    "retry.unit": "PF and SC asked again together",
    "retry.exhausted": "a random score 0-10",
    "reply.parse": "JSON object, repaired when malformed (osbench/json_util.py, not in the stored copy)",
    # test_osbench_score.py: with_single is computed but never passed on
    "rubric.pf_generation": "multiple-subject prompt for every generation case",
    "missing_prediction": "skipped",
    "languages": "every row scored; statistics filter English",
}
