"""The course edition of the notebooks: exercises a student fills in, and the grading of what comes back.

Notebooks 01, 02 and 06 carry exercises marked the nbgrader way (nbgrader's own format, so an nbgrader course
folder takes them as they are):

- a **solution cell** (cell metadata ``nbgrader.solution: true``) holds the instructor's answer between the
  lines ``### BEGIN SOLUTION`` and ``### END SOLUTION``;
- a **graded test cell** after it (``nbgrader.grade: true``, ``points``, ``locked: true``) checks the answer
  against the library with :mod:`dpolab.course.checks`, whose messages say what is wrong (a shape, a sign, a
  missing mask); lines between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` run only when grading.

The markers are comments, so the solution notebooks run unchanged under papermill and nbval. Four parts:

- :func:`dpolab.course.edition.build_edition` (``dpolab course build OUT``) writes the student notebooks: every
  solution region becomes a ``raise NotImplementedError()`` stub, hidden tests go, outputs and execution counts
  are cleared, and the result is searched for every solution line before it is written;
- :func:`dpolab.course.grading.grade_submissions` (``dpolab course grade SUBMISSIONS``) runs each submitted
  notebook cell by cell, with the test cells (hidden tests included) taken from the source notebooks, and gives
  each exercise its points when its test cell ran without an error
  (or :func:`dpolab.course.grading.autograde_with_nbgrader`, ``--nbgrader ASSIGNMENT``, hands over to nbgrader's
  autograde in an nbgrader course folder and reads its gradebook back);
- :func:`dpolab.course.book.build_book` (``dpolab course book OUT``) publishes the executed notebooks as one static
  site, offline: a contents page, previous/next links, figures embedded, MathJax from the site's own folder;
- :mod:`dpolab.course.checks`: the checks the test cells call.
"""
