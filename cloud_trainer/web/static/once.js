// Forms marked data-once submit once: a double tap on a slow tablet or phone must not
// create two sessions or send two deletes. The button says it is working.
document.addEventListener('submit', (event) => {
  const form = event.target;
  if (!form.matches('form[data-once]') || event.defaultPrevented) return;
  if (form.dataset.sent) { event.preventDefault(); return; }
  form.dataset.sent = '1';
  // A disabled button is left out of what the form sends: carry the pressed one's
  // name and value (Use / Keep the address) in a hidden field instead.
  const by = event.submitter;
  if (by && by.name) {
    const carry = document.createElement('input');
    carry.type = 'hidden'; carry.name = by.name; carry.value = by.value;
    carry.dataset.carried = '1';
    form.appendChild(carry);
  }
  for (const b of form.querySelectorAll('button[type=submit]')) {
    b.disabled = true; b.setAttribute('aria-busy', 'true');
    if (b.dataset.busy) { b.dataset.label = b.textContent; b.textContent = b.dataset.busy; }
  }
});
// A page the browser brings back from its back/forward cache (Back after a submit) is
// the page as it was left: a form already sent, its button saying "Creating…", the
// last attendee's name and consent still in it. Start its forms over, as a new page
// would (the page's own refresh brings what it shows up to date).
window.addEventListener('pageshow', (event) => {
  if (!event.persisted) return;
  for (const form of document.querySelectorAll('form[data-once]')) {
    delete form.dataset.sent;
    for (const carried of form.querySelectorAll('input[data-carried]')) carried.remove();
    form.reset();
    for (const b of form.querySelectorAll('button[type=submit]')) {
      b.disabled = false; b.removeAttribute('aria-busy');
      if (b.dataset.label) b.textContent = b.dataset.label;
    }
  }
});
