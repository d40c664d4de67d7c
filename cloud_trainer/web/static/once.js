// Forms marked data-once submit once: a double tap on a slow tablet or phone must not
// create two sessions or send two deletes. The button says it is working.
document.addEventListener('submit', (event) => {
  const form = event.target;
  if (!form.matches('form[data-once]') || event.defaultPrevented) return;
  if (form.dataset.sent) { event.preventDefault(); return; }
  form.dataset.sent = '1';
  for (const b of form.querySelectorAll('button[type=submit]')) {
    b.disabled = true; b.setAttribute('aria-busy', 'true');
    if (b.dataset.busy) b.textContent = b.dataset.busy;
  }
});
